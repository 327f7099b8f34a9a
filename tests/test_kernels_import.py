"""`import fastloop.kernels` must work without triton and without a GPU."""
import os
import subprocess
import sys
import textwrap

import torch

import fastloop.kernels as K


def _run(code: str, env_update: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_update)
    env = {k: v for k, v in env.items() if v is not None}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=120,
    )


def test_import_with_triton_blocked():
    code = """
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import fastloop.kernels as K
        assert not K.triton_available()
        assert K.unavailable_reason() == "triton is not installed", K.unavailable_reason()
        try:
            K.adam_update_
        except ImportError as exc:
            assert "triton is not installed" in str(exc)
        else:
            raise AssertionError("adam_update_ should not load without triton")
        arena = K.FlatArena([__import__("torch").zeros(3)])  # pure torch part still works
        print("ok")
    """
    res = _run(code, {"TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_reason_without_gpu_or_interpreter():
    if torch.cuda.is_available():
        import pytest

        pytest.skip("has a CUDA device")
    code = """
        import sys
        import fastloop.kernels as K
        print(K.triton_available(), K.unavailable_reason())
        assert "triton" not in sys.modules or K.unavailable_reason() == "triton is not installed"
    """
    res = _run(code, {"TRITON_INTERPRET": None})
    assert res.returncode == 0, res.stderr
    out = res.stdout.strip()
    assert out.startswith("False "), out
    assert out in ("False no CUDA device and TRITON_INTERPRET is not set",
                   "False triton is not installed")


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError):
        K.no_such_thing  # noqa: B018


def test_lazy_names_resolve_when_available():
    import pytest

    if not K.triton_available():
        pytest.skip(K.unavailable_reason())
    from fastloop.kernels import grad_norm, optim_kernels

    assert K.adam_update_ is optim_kernels.adam_update_
    assert K.sgd_update_ is optim_kernels.sgd_update_
    assert K.clip_grads_ is grad_norm.clip_grads_
    assert K.flat_grad_norm is grad_norm.flat_grad_norm
    assert K.grad_norm is grad_norm  # the module, never shadowed by a function
    assert K.ops.REGISTERED in (True, False)
