"""passes/prewarm.py: the fused kernel's variants compiled before the passes, in a child process or a thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from evalsuite import startup
from evalsuite.passes import prewarm
from evalsuite.passes.prewarm import prewarm_child, prewarm_kernels, warm_kernels


def test_nothing_is_started_without_a_gpu_or_a_vocabulary(tiny_llama):
    assert prewarm_kernels(torch.device("cpu"), 49953, [torch.float16]) is None
    assert prewarm_kernels(torch.device("cuda", 0), None, [torch.float16]) is None
    assert prewarm_child(torch.device("cpu"), str(tiny_llama), [torch.float16]) is None


def _variants(kernel, device) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this triton keeps its compiled variants elsewhere")
    entry = caches.get(device.index if device.index is not None else torch.cuda.current_device())
    return len(entry[0]) if entry else 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_passes_find_their_kernel_compiled(tiny_llama, dtype, pad):
    """After the thread, neither the reference's probe nor a test pass's (its own chunk layout,
    a padded head's view included) compiles anything new."""
    from transformers import AutoModelForCausalLM

    from evalsuite.metrics import kernels
    from evalsuite.model.forward import Scorer
    from evalsuite.model.loading import vocab_size

    device = torch.device("cuda", 0)
    vocab = vocab_size(str(tiny_llama))
    thread = prewarm_kernels(torch.device("cuda"), vocab, [dtype])  # as a run resolves --device cuda
    assert thread.reference_ready.wait(timeout=600)  # the reference's variants come first
    thread.join()
    assert thread.error is None
    before = _variants(kernels._lanes_kernel, device)
    assert before >= 1
    for p_dtype, role in ((torch.float32, "reference"), (dtype, "test")):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=p_dtype).to(device).eval()
        scorer = Scorer(model, device, pad_head=pad if p_dtype != torch.float32 else False)
        assert (scorer.padded_head is not None) == (pad and p_dtype != torch.float32)
        warm_kernels(scorer, role)
    assert _variants(kernels._lanes_kernel, device) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_failing_thread_still_lets_the_reference_start(monkeypatch):
    """The reference waits on reference_ready: a thread that fails must set it, or the run would hang."""
    def boom(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(prewarm, "_variants", boom)
    thread = prewarm_kernels(torch.device("cuda", 0), 49953, [torch.float16])
    assert thread.reference_ready.wait(timeout=60)
    thread.join()
    assert isinstance(thread.error, RuntimeError)


def _fake_child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_the_reference_may_start_once_the_child_says_so():
    """`reference` on the child's stdout sets reference_ready while the child goes on (the test
    variants); the thread ends with the child, without an error."""
    thread = prewarm_child(torch.device("cuda", 0), "unused", [torch.float16], command=_fake_child(
        "import time; print('reference', flush=True); time.sleep(3.0); print('done')"))
    assert thread.reference_ready.wait(timeout=30)
    assert thread.is_alive()  # still compiling the test variants
    thread.join(timeout=30)
    assert not thread.is_alive() and thread.error is None


def test_a_failing_child_says_why_and_releases_the_reference():
    thread = prewarm_child(torch.device("cuda", 0), "unused", [torch.float16], command=_fake_child(
        "import sys; sys.stderr.write('warning\\nno CUDA driver here\\n'); sys.exit(3)"))
    thread.join(timeout=30)
    assert thread.reference_ready.is_set()  # a reference pass waiting on it goes on
    assert isinstance(thread.error, RuntimeError)
    assert "status 3" in str(thread.error) and "no CUDA driver here" in str(thread.error)


def test_a_child_that_cannot_start_leaves_the_compile_to_the_run(tmp_path):
    assert prewarm_child(torch.device("cuda", 0), "unused", [], command=[str(tmp_path / "no-such-python")]) is None


def test_a_child_still_compiling_is_stopped_when_the_process_leaves(monkeypatch):
    """A run that fails after setup runs the exit handlers (startup.leave): the child goes with it."""
    monkeypatch.setattr(startup, "_leaving", threading.Event())  # (this test's process goes on after it)
    thread = prewarm_child(torch.device("cuda", 0), "unused", [], command=_fake_child("import time; time.sleep(60)"))
    procs = list(startup._children)
    assert len(procs) == 1 and procs[0].poll() is None
    startup.stop_children()
    thread.join(timeout=30)
    assert not thread.is_alive() and procs[0].returncode is not None
    assert thread.reference_ready.is_set() and not startup._children
    assert prewarm_child(torch.device("cuda", 0), "unused", [], command=_fake_child("pass")) is None  # none after


def test_the_child_compiles_nothing_where_triton_cannot_run(tiny_llama, capsys, monkeypatch):
    """`python -m evalsuite.passes.prewarm` without a GPU: exit 0, nothing said, the run compiles itself."""
    monkeypatch.setattr(prewarm.kernels, "available", lambda device: False)
    assert prewarm.main(["--source", str(tiny_llama), "--dtypes", "float16,bfloat16"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_run_finds_the_childs_kernels_in_the_triton_cache(tiny_llama, tmp_path, dtype):
    """The child's compiles reach the run through Triton's disk cache: a fresh process that then
    probes the reference and a test pass (warm_kernels, the pass's own chunk layout) adds no entry
    to the cache, where without the child the same probes add some."""
    name = str(dtype).removeprefix("torch.")
    probe = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from evalsuite.model.forward import Scorer\n"
        "from evalsuite.passes.prewarm import warm_kernels\n"
        "d = torch.device('cuda', 0)\n"
        f"for dt, role in ((torch.float32, 'reference'), (torch.{name}, 'test')):\n"
        "    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dt).to(d).eval()\n"
        "    warm_kernels(Scorer(m, d), role)\n")

    def entries(cache):
        return sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())

    for with_child in (True, False):
        cache = tmp_path / f"triton-{with_child}"
        env = {**os.environ, "TRITON_CACHE_DIR": str(cache)}
        if with_child:
            subprocess.run([sys.executable, "-m", "evalsuite.passes.prewarm", "--source", str(tiny_llama),
                            "--dtypes", name, "--device", "0"], env=env, check=True, timeout=600)
        before = entries(cache) if cache.exists() else []
        assert bool(before) == with_child
        subprocess.run([sys.executable, "-c", probe, str(tiny_llama)], env=env, check=True, timeout=600)
        added = set(entries(cache)) - set(before)
        assert (not added) if with_child else added, (with_child, sorted(map(str, added))[:5])


def test_the_runs_thread_loads_each_group_once_the_child_has_compiled_it(monkeypatch):
    """prewarm_kernels(after=child): the reference's variants are asked for only after the child
    said `reference`, the test dtypes' only after it ended, so each comes from Triton's cache."""
    seen = []
    monkeypatch.setattr(prewarm.kernels, "available", lambda device: True)
    monkeypatch.setattr(prewarm.torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(prewarm, "_variants", lambda vocab, device, test: seen.append(
        (test is None, child.reference_ready.is_set(), child.is_alive())))
    monkeypatch.setattr(prewarm.torch, "zeros", lambda *a, **k: torch.empty(0))
    child = prewarm_child(torch.device("cuda"), "unused", [], command=_fake_child(
        "import time; time.sleep(1.0); print('reference', flush=True); time.sleep(3.0)"))
    thread = prewarm_kernels(torch.device("cuda"), 384, [torch.float16], after=child)
    thread.join(timeout=30)
    assert thread.error is None
    assert seen == [(True, True, True), (False, True, False)]  # (reference?, child said reference, child running)


def test_a_stuck_child_is_stopped_and_the_run_goes_on(monkeypatch):
    """A child that never answers would hold the first test pass (it joins the prewarm) for ever."""
    monkeypatch.setattr(prewarm, "CHILD_TIMEOUT_S", 1.0)
    thread = prewarm_child(torch.device("cuda", 0), "unused", [], command=_fake_child("import time; time.sleep(60)"))
    thread.join(timeout=30)
    assert not thread.is_alive() and thread.reference_ready.is_set()
    assert "status -9" in str(thread.error)



def test_the_child_reads_the_vocabulary_without_importing_transformers(tiny_llama):
    """In a fresh interpreter, the child's module and its vocabulary lookup on a local checkpoint
    give AutoConfig's number and pull in no transformers (whose import more than doubled the
    child's start-up)."""
    from transformers import AutoConfig

    probe = ("import sys\n"
             "from evalsuite.passes import prewarm\n"
             "print(prewarm.vocab_size(sys.argv[1]))\n"
             "sys.exit(3 if 'transformers' in sys.modules else 0)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(tiny_llama)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(AutoConfig.from_pretrained(tiny_llama).vocab_size)


def test_the_child_compiles_for_the_configs_vocabulary(tiny_llama, monkeypatch):
    """The child compiles for the vocabulary of --source's config, AutoConfig left unread there."""
    from transformers import AutoConfig

    from evalsuite.model import loading

    seen = []
    monkeypatch.setattr(prewarm.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(prewarm.kernels, "available", lambda device: True)
    monkeypatch.setattr(prewarm, "compile_all", lambda vocab, device, dtypes, done: seen.append((vocab, dtypes)))
    monkeypatch.setattr(loading, "_text_config", lambda *a: pytest.fail("AutoConfig read for a local checkpoint"))
    assert prewarm.main(["--source", str(tiny_llama), "--dtypes", "float16"]) == 0
    assert seen == [(AutoConfig.from_pretrained(tiny_llama).vocab_size, [torch.float16])]
