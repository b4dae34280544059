"""Sweep runner: grid expansion, skip-on-done, host partition, clear errors, CLI.

Jobs are a stand-in program (a few lines of Python run as a real subprocess) that records its
arguments, so every test runs in about a second; override checking uses a small job config
file, and one test checks the real ``configs/rl_nft.py``.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from configs.sweeps import table_norms
from experiments import sweep
from normguard_jax.objectives import METHODS

JOB_CONFIG = textwrap.dedent('''
    import ml_collections

    def get_config(arg="plain"):
        c = ml_collections.ConfigDict()
        c.kind = arg
        c.exit_code = 0
        c.lr = 0.1
        c.steps = 10
        c.opt = ml_collections.ConfigDict()
        c.opt.flag = False
        c.opt.name = "adam"
        return c
''')

# Stand-in job: appends its argv to <workdir>/calls.jsonl, writes out.txt, exits with the
# value of --config.exit_code (default 0).
FAKE_JOB = textwrap.dedent('''
    import json, os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    os.makedirs(args["workdir"], exist_ok=True)
    with open(os.path.join(args["workdir"], "calls.jsonl"), "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    code = int(args.get("config.exit_code", 0))
    if code == 0:
        open(os.path.join(args["workdir"], "out.txt"), "w").write("ok")
    sys.exit(code)
''')


@pytest.fixture()
def files(tmp_path):
    job = tmp_path / "job.py"
    job.write_text(JOB_CONFIG)
    fake = tmp_path / "fake_job.py"
    fake.write_text(FAKE_JOB)
    return job, fake


def make_config(tmp_path, files, **grid_kwargs):
    job, fake = files
    c = sweep.base_config()
    c.workroot = str(tmp_path / "root")
    kwargs = dict(
        name="c-{kind}-{lr}", config=f"{job}:{{kind}}",
        axes={"kind": {"a": {}, "b": {"opt.name": "sgd-{kind}"}},
              "lr": {"small": {"lr": 0.01}, "big": {"lr": 1.0, "opt.flag": True}}},
        fixed={"steps": 3}, program=[sys.executable, str(fake)], expect=["out.txt"])
    kwargs.update(grid_kwargs)
    c.grids = [sweep.grid(**kwargs)]
    return c


def calls(cell):
    path = os.path.join(cell.workdir, "calls.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_expand_names_overrides_and_templates(tmp_path, files):
    cells = sweep.expand(make_config(tmp_path, files))
    assert [c.name for c in cells] == ["c-a-small", "c-a-big", "c-b-small", "c-b-big"]
    by_name = {c.name: c for c in cells}
    b_big = by_name["c-b-big"]
    assert dict(b_big.overrides) == {"steps": 3, "opt.name": "sgd-b", "lr": 1.0,
                                     "opt.flag": True}
    assert b_big.config.endswith("job.py:b")
    assert b_big.workdir == os.path.join(str(tmp_path / "root"), "c-b-big")
    cmd = b_big.command()
    assert f"--workdir={b_big.workdir}" in cmd
    assert "--config.opt.flag=true" in cmd and "--config.lr=1.0" in cmd
    assert "--config.opt.name=sgd-b" in cmd


def test_run_then_skip_on_done(tmp_path, files):
    config = make_config(tmp_path, files)
    out = []
    summary = sweep.run(config, out=_Sink(out))
    cells = sweep.expand(config)
    assert {e["status"] for e in summary["cells"].values()} == {"done"}
    for cell in cells:
        assert len(calls(cell)) == 1
        assert calls(cell)[0] == cell.command()[2:]  # the job saw exactly the cell's flags
        assert os.path.exists(os.path.join(cell.workdir, sweep.DONE_MARKER))
    assert any("ETA" in line for line in out)
    with open(sweep.summary_path(config.workroot, 1, 0)) as f:
        assert json.load(f)["cells"].keys() == summary["cells"].keys()
    # Second call: nothing runs again.
    again = sweep.run(config, out=_Sink([]))
    assert {e["status"] for e in again["cells"].values()} == {"skipped"}
    assert all(len(calls(cell)) == 1 for cell in cells)
    # Removing one marker reruns that cell only.
    os.remove(os.path.join(cells[1].workdir, sweep.DONE_MARKER))
    third = sweep.run(config, out=_Sink([]))
    assert [n for n, e in third["cells"].items() if e["status"] == "done"] == [cells[1].name]
    assert [len(calls(c)) for c in cells] == [1, 2, 1, 1]


def test_changed_command_of_a_finished_cell_is_an_error(tmp_path, files):
    config = make_config(tmp_path, files)
    sweep.run(config, out=_Sink([]))
    changed = make_config(tmp_path, files, fixed={"steps": 4})
    with pytest.raises(sweep.SweepError, match="another command"):
        sweep.run(changed, out=_Sink([]))


def test_failed_cell_is_not_marked_and_stops_unless_keep_going(tmp_path, files):
    config = make_config(tmp_path, files, axes={
        "kind": {"a": {}}, "lr": {"x": {"exit_code": 3}, "y": {}}})
    summary = sweep.run(config, out=_Sink([]))
    assert summary["cells"]["c-a-x"]["status"] == "failed"
    assert summary["cells"]["c-a-x"]["exit_status"] == 3
    assert summary["cells"]["c-a-y"]["status"] == "pending"
    config.keep_going = True
    summary = sweep.run(config, out=_Sink([]))
    assert summary["cells"]["c-a-x"]["status"] == "failed"
    assert summary["cells"]["c-a-y"]["status"] == "done"
    assert not os.path.exists(os.path.join(summary["cells"]["c-a-x"]["workdir"],
                                           sweep.DONE_MARKER))


def test_exit_zero_without_expected_files_is_not_done(tmp_path, files):
    config = make_config(tmp_path, files, expect=["never_written.txt"], axes={
        "kind": {"a": {}}, "lr": {"x": {}}})
    summary = sweep.run(config, out=_Sink([]))
    assert summary["cells"]["c-a-x"]["status"] == "failed"
    assert summary["cells"]["c-a-x"]["exit_status"] == 0


@pytest.mark.parametrize("num_hosts", [1, 2, 3, 5])
def test_host_partition_covers_every_cell_once_and_keeps_groups(tmp_path, files, num_hosts):
    config = make_config(tmp_path, files, group="g-{kind}")
    config.grids = list(config.grids) + [sweep.grid(
        name="e-{kind}", config=config.grids[0]["config"], axes={"kind": {"a": {}, "b": {}}},
        group="g-{kind}")]
    config.grids[0]["group"] = "g-{kind}"
    cells = sweep.expand(config)
    assert [c.name for c in cells] == ["c-a-small", "c-a-big", "e-a", "c-b-small", "c-b-big",
                                       "e-b"]  # group-major, grid order inside a group
    shares = [sweep.partition(cells, num_hosts, h) for h in range(num_hosts)]
    names = [c.name for share in shares for c in share]
    assert sorted(names) == sorted(c.name for c in cells)   # every cell exactly once
    for share in shares:
        for group in {c.group for c in share}:               # a group never splits
            assert [c.name for c in share if c.group == group] == [
                c.name for c in cells if c.group == group]


def test_hosts_from_config_or_environment(tmp_path, files):
    config = make_config(tmp_path, files)
    assert sweep.hosts(config, {}) == (1, 0)
    assert sweep.hosts(config, {"SWEEP_NUM_HOSTS": "4", "SWEEP_HOST_INDEX": "2"}) == (4, 2)
    config.num_hosts, config.host_index = 3, 1
    assert sweep.hosts(config, {"SWEEP_NUM_HOSTS": "4", "SWEEP_HOST_INDEX": "2"}) == (3, 1)
    config.host_index = 3
    with pytest.raises(sweep.SweepError, match="host_index"):
        sweep.hosts(config, {})
    # A host's run touches only its share.
    config.host_index = 0
    config.num_hosts = 2
    summary = sweep.run(config, out=_Sink([]))
    assert len(summary["cells"]) == 2 and summary["total_cells"] == 4


@pytest.mark.parametrize("axes, match", [
    ({"kind": {"a": {"opt.nmae": "x"}}, "lr": {"s": {}}}, r"'opt.nmae' is not a field.*'name'"),
    ({"kind": {"a": {"steps": "many"}}, "lr": {"s": {}}}, r"steps='many'.*int"),
    ({"kind": {"a": {"lr": True}}, "lr": {"s": {}}}, r"lr=True.*float"),
    ({"kind": {"a": {"opt": 1}}, "lr": {"s": {}}}, r"names a section"),
    ({"kind": {"a": {"lr": 0.1}}, "lr": {"s": {"lr": 0.2}}}, r"axes 'kind' and 'lr' both"),
])
def test_bad_override_fails_before_anything_runs(tmp_path, files, axes, match):
    config = make_config(tmp_path, files, axes=axes)
    with pytest.raises(sweep.SweepError, match=match):
        sweep.run(config, out=_Sink([]))
    assert not os.path.exists(os.path.join(config.workroot, "c-a-s"))


def test_bad_templates_and_names(tmp_path, files):
    with pytest.raises(sweep.SweepError, match="'methd'"):
        sweep.expand(make_config(tmp_path, files, name="c-{methd}"))
    with pytest.raises(sweep.SweepError, match="two cells are named"):
        sweep.expand(make_config(tmp_path, files, name="c-{kind}"))
    with pytest.raises(sweep.SweepError, match="must match"):
        sweep.expand(make_config(tmp_path, files, name="c {kind}-{lr}"))


def test_real_rl_config_rejects_a_misspelt_field():
    rl_nft = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "rl_nft.py")
    good = sweep.Cell(name="x", config=rl_nft, workdir="w", group="x",
                      overrides=(("normguard.weight", 0.1), ("train.iterations", 2)))
    sweep.check_overrides(good, sweep.load_job_config(rl_nft))
    bad = good.__class__(**{**good.__dict__, "overrides": (("normguard.wieght", 0.1),)})
    with pytest.raises(sweep.SweepError, match="normguard.wieght.*'weight'"):
        sweep.check_overrides(bad, sweep.load_job_config(rl_nft))


def test_cli_runs_one_hosts_share(tmp_path, files):
    job, fake = files
    sweep_file = tmp_path / "my_sweep.py"
    sweep_file.write_text(textwrap.dedent(f'''
        import sys
        from experiments import sweep

        def get_config():
            c = sweep.base_config()
            c.workroot = {str(tmp_path / "cli_root")!r}
            c.grids = [sweep.grid(name="c-{{kind}}", config={str(job) + ":{kind}"!r},
                                  axes={{"kind": {{"a": {{}}, "b": {{}}, "c": {{}}}}}},
                                  program=[sys.executable, {str(fake)!r}])]
            return c
    '''))
    cmd = [sys.executable, "-m", "experiments.sweep", f"--config={sweep_file}",
           "--config.num_hosts=2", "--config.host_index=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    ran = sorted(os.listdir(tmp_path / "cli_root"))
    assert ran == ["c-b", "sweep_summary_host1of2.json"]
    bad = subprocess.run(cmd[:4] + ["--config.host_index=2"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "host_index must be in [0, num_hosts)" in bad.stderr


class _Sink:
    """File-like collector of the runner's progress lines."""

    def __init__(self, lines):
        self.lines = lines

    def write(self, text):
        if text.strip():
            self.lines.append(text)

    def flush(self):
        pass


@pytest.mark.parametrize("spec", ["table_main.py", "table_lambda.py:digits_contrast,dpo",
                                  "table_fewstep.py", "table_earlystop.py",
                                  "guard_ablation.py", "guard_ablation.py:awm_contrast",
                                  "table_norms.py", "table_seeds.py",
                                  "table_seeds.py:rebase"])
def test_shipped_table_sweeps_name_real_fields(spec, monkeypatch):
    """Every cell of the sweeps in configs/sweeps/ overrides existing fields of its job config,
    and every evaluation cell reads an RL workdir that an RL cell of the table writes."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(repo)  # the sweeps name their job configs relative to the repository
    sweep_config = sweep.load_job_config(os.path.join("configs", "sweeps", spec))
    cells = sweep.expand(sweep_config)
    loaded = {}
    for cell in cells:
        if cell.config not in loaded:
            loaded[cell.config] = sweep.load_job_config(cell.config)
        sweep.check_overrides(cell, loaded[cell.config])
    rl_dirs = set()
    for s in ("table_main.py", "table_lambda.py:digits_contrast,dpo", "guard_ablation.py",
              "guard_ablation.py:awm_contrast", "table_norms.py", "table_seeds.py"):
        rl_dirs |= {c.workdir for c in sweep.expand(sweep.load_job_config(
            os.path.join("configs", "sweeps", s))) if c.name.startswith("rl-")}
    for cell in cells:
        checkpoint = dict(cell.overrides).get("checkpoint", "")
        if checkpoint.startswith("workdir/sweeps/"):
            assert checkpoint in rl_dirs, (cell.name, checkpoint)
    assert len({c.name for c in cells}) == len(cells)
    # An evaluation of an RL cell of the same sweep runs after it, on the same host.
    by_workdir = {c.workdir: (i, c) for i, c in enumerate(cells)}
    for i, cell in enumerate(cells):
        checkpoint = dict(cell.overrides).get("checkpoint", "")
        if checkpoint in by_workdir:
            j, rl_cell = by_workdir[checkpoint]
            assert rl_cell.group == cell.group and j < i


def test_norm_analyses_runs_are_cells_of_the_table_sweeps(monkeypatch):
    """The runs experiments/run_all.py hands to norm_analyses.py (every method, both arms) are
    RL cells of table_main.py or table_norms.py (so the sweeps make every one of them)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(repo)
    rl_dirs = set()
    for s in ("table_main.py", "table_norms.py"):
        rl_dirs |= {c.workdir for c in sweep.expand(sweep.load_job_config(
            os.path.join("configs", "sweeps", s))) if c.name.startswith("rl-")}
    runs = table_norms.run_dirs()
    assert len(runs) == 2 * len(METHODS) and set(runs) <= rl_dirs


def test_guard_ablation_unknown_study_is_named():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with pytest.raises(ValueError, match="awm_contrast"):
        sweep.load_job_config(os.path.join(repo, "configs", "sweeps", "guard_ablation.py:nope"))
