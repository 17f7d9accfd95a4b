"""CudaGraphRunner (wan_rt.runtime.cuda_graphs): replay equals a plain call, per signature."""

from __future__ import annotations

import pytest
import torch

from wan_rt.runtime.cuda_graphs import CudaGraphRunner, signature

GPU = torch.cuda.is_available()


def needs_gpu(test):
    """Skipped without a CUDA GPU, and marked `gpu` so `pytest -m gpu` (bench/gpu_check.sh) runs it."""
    return pytest.mark.gpu(pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")(test))


def _runner(weight: torch.Tensor):
    def run(inputs):
        x = inputs["x"]
        return {"y": torch.tanh(x @ weight) * inputs["scale"], "n": x.square().sum(-1)}
    return run


def test_signature_names_shapes_and_dtypes():
    a = {"x": torch.zeros(2, 3), "t": torch.zeros(2, dtype=torch.int64)}
    assert signature(a) == signature({"t": torch.ones(2, dtype=torch.int64), "x": torch.ones(2, 3)})
    assert signature(a) != signature({"x": torch.zeros(1, 3), "t": torch.zeros(2, dtype=torch.int64)})
    assert signature(a) != signature({"x": torch.zeros(2, 3, dtype=torch.float64), "t": torch.zeros(2, dtype=torch.int64)})


@pytest.mark.skipif(GPU, reason="checks the refusal on a machine without a CUDA GPU")
def test_refused_without_a_gpu():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA GPU"):
        CudaGraphRunner(_runner(torch.eye(3)))


@needs_gpu
def test_replay_matches_plain_calls_and_outputs_survive_later_calls():
    weight = torch.randn(64, 32, device="cuda")
    plain = _runner(weight)
    graphed = CudaGraphRunner(plain, warmup=1)
    outputs = []
    for seed in range(4):
        g = torch.Generator(device="cuda").manual_seed(seed)
        inputs = {"x": torch.randn(8, 64, device="cuda", generator=g), "scale": torch.rand(1, device="cuda", generator=g)}
        got = graphed(inputs)
        want = plain(inputs)
        for k in want:
            torch.testing.assert_close(got[k], want[k])
        outputs.append((got, want))
    assert graphed.replays == 3 and len(graphed.graphs) == 1  # call 1 plain, 2 captured, 3-4 replayed
    for got, want in outputs:  # cloned out of the graph's memory: earlier results unchanged
        torch.testing.assert_close(got["y"], want["y"])


@needs_gpu
def test_each_shape_gets_its_own_graph_and_the_oldest_is_dropped():
    weight = torch.randn(16, 16, device="cuda")
    graphed = CudaGraphRunner(_runner(weight), warmup=0, max_graphs=2)
    for rows in (1, 2, 3, 2):
        inputs = {"x": torch.randn(rows, 16, device="cuda"), "scale": torch.ones(1, device="cuda")}
        torch.testing.assert_close(graphed(inputs)["y"], _runner(weight)(inputs)["y"])
    assert [k[1][1][0] for k in graphed.graphs] == [3, 2]  # rows of "x"; rows=1 evicted


@needs_gpu
def test_cpu_inputs_are_refused_at_capture():
    graphed = CudaGraphRunner(_runner(torch.eye(4, device="cuda")), warmup=0)
    with pytest.raises(ValueError, match="x is on cpu"):
        graphed({"x": torch.zeros(1, 4), "scale": torch.ones(1)})
