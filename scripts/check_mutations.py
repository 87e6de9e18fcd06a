"""The default test tier must catch these deliberate bugs: each is applied to the source, the
default-tier tests of the files meant to catch it run, and the source is restored whatever happens.

    .venv/bin/python scripts/check_mutations.py            # all, about a minute each on 2 cores
    .venv/bin/python scripts/check_mutations.py align      # the ones whose name contains "align"

Prints CAUGHT or MISSED per bug with the first failing tests; exits 1 if any is missed.
"""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MUTATIONS = [
    ("gate ignores the correction bias", "moecompile/codegen/triton/gate.py",
     "choice += tl.load(cb_ptr + cols, mask=col_ok, other=0.0)", "choice += 0.0 * tl.load(cb_ptr + cols, mask=col_ok, other=0.0)",
     ["tests/test_triton_gate_align.py", "tests/test_triton_program.py"]),
    ("align not stable", "moecompile/codegen/triton/align.py",
     "rank = placed + tl.cumsum(hit.to(tl.int32), axis=0) - 1",
     "rank = placed + tl.sum(hit.to(tl.int32), axis=0) - tl.cumsum(hit.to(tl.int32), axis=0)",
     ["tests/test_triton_gate_align.py", "tests/test_triton_program.py"]),
    ("weight_grad drops the top-k weight", "moecompile/codegen/triton/backward.py",
     "at = (at.to(ACC) * w[:, None]).to(a_ptr.dtype.element_ty)", "at = (at.to(ACC) * 1.0).to(a_ptr.dtype.element_ty)",
     ["tests/test_triton_backward.py"]),
    ("combine drops the shared expert", "moecompile/codegen/triton/grouped_gemm.py",
     "        acc += tl.load(shared_ptr + toks64[:, None] * stride_st",
     "        acc += 0.0 * tl.load(shared_ptr + toks64[:, None] * stride_st",
     ["tests/test_triton_grouped_gemm.py", "tests/test_triton_program.py"]),
    ("verification accepts a wrong renormalization", "moecompile/verify.py",
     "    return worst <= rtol and (mean_rtol is None or err.mean().item() <= mean_rtol), worst",
     "    return True, worst",
     ["tests/test_detect.py", "tests/test_verify.py"]),
]
only = sys.argv[1:]
missed = 0
for what, path, old, new, tests in MUTATIONS:
    if only and not any(o in what for o in only):
        continue
    p = ROOT / path
    src = p.read_text()
    assert src.count(old) == 1, (what, src.count(old))
    p.write_text(src.replace(old, new))
    try:
        r = subprocess.run([".venv/bin/python", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-n", "2", *tests],
                           capture_output=True, text=True, cwd=ROOT)
    finally:
        p.write_text(src)
    tail = [l for l in r.stdout.splitlines() if l.startswith("FAILED")][:3] + r.stdout.splitlines()[-1:]
    missed += r.returncode == 0
    print(f"{'CAUGHT' if r.returncode != 0 else 'MISSED'}: {what}", *tail, sep="\n  ", flush=True)
sys.exit(1 if missed else 0)
