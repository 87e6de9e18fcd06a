"""codegen.autotune: which config `pick` returns, what it times, what it keeps in memory and on disk.

No GPU: a fake timer returns fixed times per config (a non-CUDA device tunes only with a timer), and
a toy kind with a three-config space stands in for the kernels, except where grouped_gemm's own
spaces and the combine launcher are the point.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

from moecompile.codegen import autotune

TOY_SPACE = [{"BLOCK": 16}, {"BLOCK": 32}, {"BLOCK": 64}]  # the default first, as grouped_gemm's
TOY_MS = {16: 3.0, 32: 1.0, 64: 2.0}  # 32 is the fastest, and not the default
SHAPE = {"E": 8, "N": 96, "K_dim": 160, "dtype": torch.bfloat16, "device": "cpu"}
KEY_FIELDS = {"kind", "E", "N", "K_dim", "dtype", "device", "triton", "tpe_bucket"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MOECOMPILE_AUTOTUNE", raising=False)
    monkeypatch.setitem(autotune._registry, "toy", (lambda *a: dict(TOY_SPACE[0]),
                                                   lambda *a: [dict(c) for c in TOY_SPACE]))
    autotune.clear()
    yield
    autotune.clear()


class FakeTimer:
    """timer(run, config) -> ms from a table; records every config it timed; raises for `fail`."""

    def __init__(self, ms=TOY_MS, fail=(), during=None):
        self.ms, self.fail, self.during, self.timed = ms, set(fail), during, []

    def __call__(self, run, config):
        self.timed.append(config["BLOCK"])
        if self.during is not None:
            self.during()
        if config["BLOCK"] in self.fail:
            raise RuntimeError(f"out of resources: BLOCK={config['BLOCK']}")
        return self.ms[config["BLOCK"]]


def _never(run, config):
    raise AssertionError(f"timed {config}; expected a cached or default config")


def _pick(timer=None, kind="toy", tpe=37, **shape):
    return autotune.pick(kind, **{**SHAPE, **shape}, tokens_per_expert=tpe, run=lambda cfg: None, timer=timer)


def _file_entries() -> dict:
    with open(autotune.cache_path()) as f:
        data = json.load(f)
    assert data["format"] == 1
    return data["entries"]


# -- choosing -----------------------------------------------------------------------------------


def test_fastest_wins():
    timer = FakeTimer()
    assert _pick(timer) == {"BLOCK": 32}
    assert sorted(timer.timed) == [16, 32, 64]
    [entry] = autotune.describe()
    assert (entry["config"], entry["ms"], entry["tried"], entry["failed"], entry["source"]) == \
        ({"BLOCK": 32}, 1.0, 3, {}, "tuned")
    assert autotune.counters() == {"tuned": 1, "configs_failed": 0}


def test_failing_candidate_is_skipped_and_counted():
    timer = FakeTimer(ms={16: 3.0, 32: 1.0, 64: float("nan")}, fail={32})
    assert _pick(timer) == {"BLOCK": 16}  # 32 raised, 64 gave no time
    [entry] = autotune.describe()
    assert entry["failed"] == {"RuntimeError": 1, "bad time": 1}
    assert autotune.counters()["configs_failed"] == 2


def test_all_failing_gives_the_default_and_saves_nothing():
    assert _pick(FakeTimer(fail={16, 32, 64})) == {"BLOCK": 16}
    assert not os.path.exists(autotune.cache_path())
    [entry] = autotune.describe()
    assert (entry["source"], entry["ms"], entry["failed"]) == ("default", None, {"RuntimeError": 3})
    assert _pick(_never) == {"BLOCK": 16}  # not tuned again in this process


def test_returned_config_is_a_copy():
    _pick(FakeTimer())["BLOCK"] = 999
    assert _pick(_never) == {"BLOCK": 32}


# -- the key ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tpe, want", [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (0.5, 1), (2.5, 4),
                                       (64, 64), (65, 128), (4096, 4096), (4097, 4096), (10 ** 7, 4096)])
def test_bucket_boundaries(tpe, want):
    assert autotune.bucket(tpe) == want


@pytest.mark.parametrize("bad", [-1, float("nan"), True])
def test_bucket_rejects(bad):
    with pytest.raises(ValueError, match="tokens_per_expert"):
        autotune.bucket(bad)


def test_key_holds_the_bucket_never_the_token_count():
    E, K = SHAPE["E"], 2
    timer = FakeTimer()
    for T in (300, 301, 509):  # 75, 75.25, 127.25 tokens per expert: one bucket, 128
        assert _pick(timer, tpe=T * K / E) == {"BLOCK": 32}
    assert len(timer.timed) == len(TOY_SPACE)  # tuned once for the three
    [entry] = autotune.describe()
    assert set(entry) - {"key", "config", "ms", "tried", "failed", "source"} == KEY_FIELDS
    assert entry["tpe_bucket"] == 128 and entry["key"].endswith("|tpe<=128")
    assert not any(s in entry["key"] for s in ("300", "301", "509", "75", "127"))
    assert entry["key"] == autotune.key("toy", 8, 96, 160, torch.bfloat16, "cpu", 128)
    _pick(timer, tpe=129)  # the next bucket is another key
    assert len(timer.timed) == 2 * len(TOY_SPACE)


@pytest.mark.parametrize("change", [{"E": 16}, {"N": 128}, {"K_dim": 128}, {"dtype": torch.float32}],
                         ids=lambda c: next(iter(c)))
def test_each_shape_field_is_its_own_key(change):
    timer = FakeTimer()
    _pick(timer)
    _pick(timer, **change)
    assert len(timer.timed) == 2 * len(TOY_SPACE)


# -- memory and disk ----------------------------------------------------------------------------


def test_cache_hit_does_not_retime():
    timer = FakeTimer()
    _pick(timer, tpe=37)
    assert _pick(timer, tpe=60) == {"BLOCK": 32}  # same bucket (64)
    assert len(timer.timed) == len(TOY_SPACE)
    assert autotune.counters()["memory"] == 1


def test_disk_round_trip_in_a_fresh_memory_cache():
    _pick(FakeTimer())
    [(key, saved)] = _file_entries().items()
    assert saved["config"] == {"BLOCK": 32} and saved["ms"] == 1.0 and saved["tpe_bucket"] == 64
    autotune.clear()  # as a new process
    assert _pick(_never) == {"BLOCK": 32}
    assert autotune.counters() == {"disk": 1}
    assert [e["source"] for e in autotune.describe()] == ["disk"]
    # one file, no temporary files left behind (the lock file stays where flock exists)
    assert set(os.listdir(os.path.dirname(autotune.cache_path()))) <= {"autotune.json", "autotune.json.lock"}


CORRUPT = {"not JSON": b'{"format": 1, "entries": {', "empty": b"", "not utf-8": b"\xff\xfe{",
           "a list": b"[1, 2]", "another format": b'{"format": 99, "entries": {}}',
           "entries not a dict": b'{"format": 1, "entries": [1]}'}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_file_warns_once_and_is_replaced(content):
    path = autotune.cache_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _pick(FakeTimer()) == {"BLOCK": 32}
        assert _pick(FakeTimer(), E=16) == {"BLOCK": 32}  # read twice more: warned once per file
    assert len(caught) == 1 and path in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller, not into autotune
    assert len(_file_entries()) == 2  # overwritten with valid JSON


def test_cache_folder_that_cannot_be_made_warns_and_still_picks(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("MOECOMPILE_CACHE_DIR", str(tmp_path / "a_file"))
    with pytest.warns(UserWarning, match="not saved") as caught:
        assert _pick(FakeTimer()) == {"BLOCK": 32}
    assert len(caught) == 1


STALE = {"config left the space": {"config": {"BLOCK": 128}, "ms": 0.1},
         "no time": {"config": {"BLOCK": 64}, "ms": "fast"},
         "no config": {"ms": 0.1}}


@pytest.mark.parametrize("entry", STALE.values(), ids=STALE.keys())
def test_stale_or_malformed_entry_is_tuned_again(entry):
    key = autotune.key("toy", 8, 96, 160, torch.bfloat16, "cpu", 64)
    other = {"config": {"BLOCK": 1}, "ms": 1.0}  # another key's entry, kept by the next save
    os.makedirs(os.path.dirname(autotune.cache_path()))
    with open(autotune.cache_path(), "w") as f:
        json.dump({"format": 1, "entries": {key: entry, "other": other}}, f)
    timer = FakeTimer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bad entry is not a bad file
        assert _pick(timer) == {"BLOCK": 32}
    assert len(timer.timed) == len(TOY_SPACE)
    entries = _file_entries()
    assert entries[key]["config"] == {"BLOCK": 32} and entries["other"] == other


def test_concurrent_writer_is_merged():
    """Another process saves its entry while this one is timing: the save keeps both."""
    theirs = {"config": {"BLOCK": 64}, "ms": 2.0}

    def other_process_saves():
        if not os.path.exists(autotune.cache_path()):
            os.makedirs(os.path.dirname(autotune.cache_path()), exist_ok=True)
            with open(autotune.cache_path(), "w") as f:
                json.dump({"format": 1, "entries": {"theirs": theirs}}, f)

    _pick(FakeTimer(during=other_process_saves))
    entries = _file_entries()
    assert entries["theirs"] == theirs and len(entries) == 2


def test_concurrent_savers_keep_every_entry():
    """Eight tunings of eight keys in threads save at once: the file ends with all eight."""
    n = 8
    barrier = threading.Barrier(n)  # every thread is tuning before any saves
    errors = []

    def tune(E):
        first = [True]

        def wait_once():
            if first:
                first.clear()
                barrier.wait(timeout=10)
        try:
            _pick(FakeTimer(during=wait_once), E=E)
        except Exception as err:  # noqa: BLE001 -- reported in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=tune, args=(E,)) for E in range(1, n + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(_file_entries()) == n


# -- switched off, off CUDA ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "false", "False"])
def test_autotune_off_pins_the_default_and_touches_no_file(value, monkeypatch):
    path = autotune.cache_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"corrupt")  # would warn if read
    monkeypatch.setenv("MOECOMPILE_AUTOTUNE", value)
    assert not autotune.enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _pick(_never) == {"BLOCK": 16}
    with open(path, "rb") as f:
        assert f.read() == b"corrupt"
    assert os.listdir(os.path.dirname(path)) == ["autotune.json"]
    assert autotune.describe() == [] and autotune.counters() == {"default": 1}


def test_autotune_off_writes_nothing_even_after_tuning_was_cached(monkeypatch):
    _pick(FakeTimer())
    os.remove(autotune.cache_path())
    monkeypatch.setenv("MOECOMPILE_AUTOTUNE", "0")
    assert _pick(_never) == {"BLOCK": 16}  # the default, not the tuned 32 in memory
    assert not os.path.exists(autotune.cache_path())


def test_cpu_without_timer_gives_the_default_untimed():
    ran = []
    cfg = autotune.pick("toy", **SHAPE, tokens_per_expert=37, run=ran.append)
    assert cfg == {"BLOCK": 16} and ran == []
    assert not os.path.exists(os.path.dirname(autotune.cache_path()))


# -- locations, registry, kernels ---------------------------------------------------------------


def test_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMPILE_CACHE_DIR", str(tmp_path / "mine"))
    assert autotune.cache_path() == str(tmp_path / "mine" / "autotune.json")
    monkeypatch.delenv("MOECOMPILE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path() == str(tmp_path / "xdg" / "moecompile" / "autotune.json")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # invalid per the XDG spec: ignored
    assert autotune.cache_path() == str(tmp_path / "home" / ".cache" / "moecompile" / "autotune.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert autotune.cache_path() == str(tmp_path / "home" / ".cache" / "moecompile" / "autotune.json")


def test_one_info_line_per_tuned_key(caplog):
    with caplog.at_level(logging.INFO, logger="moecompile.autotune"):
        _pick(FakeTimer())
        _pick(FakeTimer())
    [record] = [r for r in caplog.records if r.levelno == logging.INFO]
    assert autotune.cache_path() in record.getMessage()


def test_unknown_kind_and_bad_registration():
    with pytest.raises(ValueError, match="'nope' is not registered"):
        _pick(FakeTimer(), kind="nope")
    with pytest.raises(ValueError, match="autotune.register"):
        autotune.register("", len, len)


def test_importing_autotune_does_not_import_triton():
    code = "import sys, moecompile.codegen.autotune; assert 'triton' not in sys.modules, 'triton'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("kind, N, K_dim", [("gate_up", 96, 160), ("down", 160, 96), ("combine", 160, 2)])
def test_grouped_gemm_kinds_use_its_spaces(kind, N, K_dim):
    from moecompile.codegen.triton import grouped_gemm

    shape = dict(SHAPE, N=N, K_dim=K_dim)
    args = (kind, shape["E"], N, K_dim, shape["dtype"])
    space = grouped_gemm.config_space(*args)
    assert _pick(None, kind=kind, **shape) == grouped_gemm.default_config(*args)  # cpu, no timer
    last = space[-1]
    got = _pick(lambda run, cfg: 0.5 if cfg == last else 1.0, kind=kind, **shape)
    assert got == last != space[0]


def test_combine_launcher_takes_every_config_of_its_space():
    """pick's run on the real combine kernel (interpreter on CPU): every candidate launches and
    gives the reference's output."""
    from moecompile.codegen.triton import grouped_gemm

    T, K, H = 5, 2, 16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    y = torch.randn(T * K + 3, H, device=device)
    inv = torch.randperm(T * K + 3, device=device)[:T * K].to(torch.int32)
    kw = {"num_tokens": T, "top_k": K, "out_dtype": torch.float32}
    want = grouped_gemm.combine_reference(y, inv, **kw)
    ran = []

    def run(config):
        torch.testing.assert_close(grouped_gemm.combine(y, inv, **kw, config=config), want)
        ran.append(config)

    def timer(run, config):
        run(config)
        return float(config["BLOCK_M"])  # fewest tokens per program "fastest"

    got = autotune.pick("combine", E=8, N=H, K_dim=K, dtype=torch.float32, device=device,
                        tokens_per_expert=T * K / 8, run=run, timer=timer)
    space = grouped_gemm.config_space("combine", 8, H, K, torch.float32)
    assert ran == space and got == min(space, key=lambda c: c["BLOCK_M"])


def test_flags_join_the_key(tmp_path, monkeypatch):
    """Two variants of one kernel at the same shapes (another layout, another epilogue) tune apart."""
    monkeypatch.setenv("MOECOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MOECOMPILE_AUTOTUNE", raising=False)
    autotune.clear()
    timed = []

    def timer(run, config):
        timed.append(config["BLOCK_N"])
        return float(config["BLOCK_N"] * config["BLOCK_K"])

    args = dict(E=8, N=64, K_dim=64, dtype=torch.bfloat16, device="cpu", tokens_per_expert=4, run=lambda c: None,
                timer=timer)
    autotune.pick("down", flags="epilogue=topk_weight", **args)
    n = len(timed)
    autotune.pick("down", flags="epilogue=topk_weight", **args)
    assert len(timed) == n  # a hit
    autotune.pick("down", flags="epilogue=none", **args)
    assert len(timed) == 2 * n  # another variant: tuned on its own
    keys = [e["key"] for e in autotune.describe()]
    assert sorted(k.rsplit("|", 1)[-1] for k in keys) == ["epilogue=none", "epilogue=topk_weight"]
