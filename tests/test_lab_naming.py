"""Lab names and addressing: pure functions, no privileges."""

import pytest

from meshlab import naming
from meshlab.errors import LabError
from meshlab.naming import LabNames


@pytest.mark.parametrize("name", ["lab", "a", "t0123abcd", "demo2"])
def test_valid_lab_names(name):
    assert naming.check_lab_name(name) == name


@pytest.mark.parametrize("name", ["", "Lab", "1lab", "lab-x", "lab_x", "abcdefghijk", "hm lab", "../x"])
def test_invalid_lab_names_say_why(name):
    with pytest.raises(LabError, match="invalid lab name"):
        naming.check_lab_name(name)


@pytest.mark.parametrize("nodes,pods,word", [(0, 1, "--nodes"), (33, 1, "--nodes"), (1, 0, "--pods-per-node"),
                                             (2, 65, "--pods-per-node"), (-1, 2, "--nodes")])
def test_invalid_counts(nodes, pods, word):
    with pytest.raises(LabError, match=word):
        naming.check_counts(nodes, pods)


def test_addresses_follow_architecture():
    assert naming.node_ip(1) == "198.18.0.11"
    assert naming.pod_cidr(2) == "198.18.2.0/24"
    assert naming.pod_ip(2, 3) == "198.18.2.3"
    assert naming.CONTROLPLANE_IP == "198.18.0.2"
    assert naming.SERVICE_CIDR == "198.19.0.0/16"


def test_namespace_names_round_trip():
    n = LabNames("lab")
    assert n.node_ns("node1") == "hm-lab-node1"
    assert n.pod_ns("node1", "pod-2") == "hm-lab-node1-pod-2"
    assert n.parse_ns("hm-lab-node1-pod-2") == ("node1", "pod-2")
    assert n.parse_ns("hm-lab-node12") == ("node12", None)
    assert n.parse_ns("hm-lab-fabric") is None
    assert n.parse_ns("hm-lab2-node1") is None  # another lab's prefix never matches
    assert n.parse_ns("hm-lab-node1-x") is None


def test_pod_veth_names_fit_the_kernel_limit():
    assert len(naming.pod_veth(naming.pod_name(naming.MAX_PODS_PER_NODE))) <= 15
