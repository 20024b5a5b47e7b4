"""The central control plane: config model, sources, per-node snapshots, gRPC server and CA."""
