"""Test machinery that ships with tinyllm (as numpy.testing ships with NumPy).

- `tinyllm.testing.cupy_standin` (with `cupyx_standin`): a stand-in for CuPy that runs on NumPy,
  so the CuPy path of tinyllm runs and is checked on machines without a GPU (CI). It keeps CuPy's
  rules (a device array type of its own, no silent host/device mixing, no implicit conversion to
  NumPy) and counts what costs time on a real GPU: host syncs, kernel launches, hidden copies,
  host<->device copies, each by the source line that caused it.
- `tinyllm.testing.syncs`: run training steps through the stand-in and report the host syncs of
  each step, line by line (`python -m tinyllm.testing.syncs`).

`tinyllm.backend.use_cupy(module)` plugs a stand-in in for `device="cuda"`; so does the
environment variable `TINYLLM_CUPY=standin` (for scripts' `--smoke` runs). Numbers measured on the
stand-in are never GPU figures: everything that reports them says "stand-in".
"""
