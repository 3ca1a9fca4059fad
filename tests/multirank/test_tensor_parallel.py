"""Real multi-process worker groups over gloo: parity at tp=2, rank death, clean shutdown."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.errors import WorkerGroupError
from common.sampling import SamplingParams
from gpu_worker.engine.executor import Executor
from gpu_worker.engine.model_runner import RunnerSpec
from gpu_worker.llm import Engine
from tests.checkpoints import hf_reference_logits
from tests.parity import BLOCK_SIZE, NUM_BLOCKS, paged_logits

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:   # a zombie is as good as gone
        return f.read().split()[2] != "Z"


def wait_gone(pids, timeout_s=10.0) -> float:
    start = time.monotonic()
    while any(pid_alive(p) for p in pids):
        assert time.monotonic() - start < timeout_s, f"ranks {pids} still alive after {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_tp2_logits_match_transformers(which, tiny_llama_dir, tiny_qwen2_dir):
    model_dir = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[which]
    token_ids = torch.randint(0, 500, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    reference = hf_reference_logits(model_dir, token_ids)
    executor = Executor(RunnerSpec(str(model_dir), "float32", "cpu", BLOCK_SIZE, NUM_BLOCKS), world_size=2)
    try:
        logits, positions = paged_logits(executor.execute, token_ids, prefill_chunks=[11, 7])
    finally:
        executor.shutdown()
    assert (logits - reference[positions]).abs().max().item() <= 1e-4


def test_tp2_engine_generates_what_tp1_generates(tiny_llama_dir):
    prompts = ["one two three", "a much longer prompt with several more words in it", "x"]
    with Engine(str(tiny_llama_dir), tp=1) as single:
        expected = [r.token_ids for r in single.generate(prompts, GREEDY)]
    with Engine(str(tiny_llama_dir), tp=2) as group:
        assert [r.token_ids for r in group.generate(prompts, GREEDY)] == expected
        pids = group.llm.executor.child_pids
    assert wait_gone(pids, 5) < 5   # close() stopped the child rank


def test_dead_rank_fails_the_group_fast_instead_of_hanging(tiny_llama_dir):
    engine = Engine(str(tiny_llama_dir), tp=2)
    [child] = engine.llm.executor.child_pids
    os.kill(child, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerGroupError, match="rank"):
        engine.generate("hello", GREEDY)
    assert time.monotonic() - start < 5
    engine.close()
    assert not torch.distributed.is_initialized()  # the failed group is gone: this process can start another


def test_child_ranks_exit_when_rank0_dies(tiny_llama_dir):
    script = (
        "import sys, time\n"
        "from gpu_worker.llm import Engine\n"
        "if __name__ == '__main__':\n"
        f"    e = Engine({str(tiny_llama_dir)!r}, tp=2)\n"
        "    print(*e.llm.executor.child_pids, flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        children = [int(p) for p in proc.stdout.readline().split()]
        assert children and all(pid_alive(p) for p in children)
        proc.kill()
        proc.wait()
        assert wait_gone(children, 10) < 10
    finally:
        proc.kill()


COLLECTIVE_TIMEOUT_S = 3.0


def idle_past_the_collective_timeout(engine: Engine) -> None:
    """Leave the group without a step for longer than its ranks' collective timeout (measured, not assumed)."""
    idle_from = time.monotonic()
    deadline = idle_from + COLLECTIVE_TIMEOUT_S * 1.5
    while time.monotonic() < deadline:
        time.sleep(0.1)
    assert time.monotonic() - idle_from > COLLECTIVE_TIMEOUT_S


def test_an_idle_group_outlives_its_collective_timeout(tiny_llama_dir):
    with Engine(str(tiny_llama_dir), tp=2, collective_timeout_s=COLLECTIVE_TIMEOUT_S) as group:
        first = group.generate("before the pause", GREEDY)[0].token_ids
        idle_past_the_collective_timeout(group)
        [child] = group.llm.executor.child_pids
        assert pid_alive(child)
        assert group.generate("before the pause", GREEDY)[0].token_ids == first


def test_without_keepalives_an_idle_group_loses_its_ranks(tiny_llama_dir, monkeypatch):
    """The failure the keepalive prevents (found by the chaos soak: idle tp=2 groups died after 60 s)."""
    monkeypatch.setattr(Executor, "_keep_alive", lambda self: None)
    engine = Engine(str(tiny_llama_dir), tp=2, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    try:
        engine.generate("before the pause", GREEDY)
        [child] = engine.llm.executor.child_pids
        idle_past_the_collective_timeout(engine)
        wait_gone([child], timeout_s=10)
        with pytest.raises(WorkerGroupError):
            engine.generate("after the pause", GREEDY)
    finally:
        engine.close()
