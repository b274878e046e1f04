"""Reports of training runs: one table per method with mean ± std across seeds, and accuracy curves.

A run folder is what `fastse pretrain` or `fastse semi` writes: `metrics.jsonl`, `run.json` (the config,
and per start of the run its time, command, commit and device; for runs older than it, the config of
the newest checkpoint is read) and, after `fastse eval-linear` / `knn`, `eval.json`. Runs whose
settings differ only in the seed (and in bookkeeping: paths, logging, devices) form a group: one row of
the table, one line of the plot (mean across seeds, shaded from the lowest to the highest seed). Rows
are labelled by what differs between the groups of a table, e.g. `ema` vs `sts p=0.7 tensor`.

Pretraining tables (one per method) give the teacher's kNN top-1 at the last step (and the online probe's,
where the runs had one) and the top-1 of every
eval.json kind, its headline result (`fastse.results`: the newest of the teacher on all the data; the
run's other results, of the student or of a --limit subset, are listed with the run, marked); FixMatch
tables the smoothed model's (teacher's) test top-1, the median of its last 20 evaluations (FixMatch's
figure) and the last one, and the student's median. Accuracies are in %. Each table's plot shows the
accuracy curve and, under it, the teacher's momentum, updated fraction and distance to the student.
Rows of another teacher rule compare their main figure with the EMA row of the same settings (difference
± standard error, inside or beyond the noise) and say what the paper claims and whether the row agrees.
Nothing here imports torch; matplotlib is imported (Agg, no pyplot) only to draw the plots.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastse.choices import METHODS
from fastse.results import MEDIAN_OF, headlines, is_headline, qualifiers, read_results
from fastse.settings import renamed

TEACHER = ("rule", "keep_prob", "granularity")
# settings that do not change what is trained or measured: runs differing only in these (and the seed) are seeds
BOOKKEEPING = frozenset({
    "seed", "split_seed", "out", "data", "cache_dir", "device", "loader", "compile", "channels_last", "deterministic",
    "max_steps", "wandb", "wandb_project", "wandb_entity", "wandb_group", "wandb_tags", "wandb_name", "log_every",
    "knn_every", "ckpt_every", "keep_ckpts", "online_probe", "probe_lr", "monitor"})
# the settings a table states when all its rows share them
SHARED = {
    "pretrain": ("arch", "dataset", "image_size", "limit", "epochs", "batch_size", "lr", "weight_decay", "optimizer",
                 "momentum", "momentum_schedule", "buffers", "knn_k"),
    "semi": ("dataset", "depth", "widen", "num_labels", "total_steps", "labeled_batch", "mu", "threshold", "lr",
             "momentum", "buffers", "teacher_targets", "eval_every"),
}
# What the paper (Huang et al., NeurIPS 2021, abstract) claims for each teacher rule against EMA (TMA): STS
# "brings general (sometimes significant) improvement" (BYOL: +0.9 ImageNet linear top-1; FixMatch: about +6
# top-1 on CIFAR-10 with few labels); SE alone "obtains comparable performance". By rule, then method.
CLAIMS = {"sts": "above EMA", "se": "level with EMA"}
CLAIMED_FIGURES = {("sts", "byol"): " (+0.9 ImageNet linear)", ("sts", "fixmatch"): " (~+6, few labels)"}
METHOD_NAMES = {"byol": "BYOL pretraining", "mocov2": "MoCo v2 pretraining", "fixmatch": "FixMatch"}
EVAL_NAMES = {"knn": "kNN top-1 (fastse knn)"}  # other eval.json kinds are linear protocols
# the teacher's statistics at every metrics line, plotted under the accuracy: key -> axis label
TEACHER_STATS = {"momentum": "teacher momentum", "updated_fraction": "updated fraction",
                 "distance": "distance ‖ξ − θ‖ / ‖θ‖"}


class ReportError(ValueError):
    """A folder that is not a run, or runs that cannot be reported; the message names the path."""


# ------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    """One run folder: its config, metrics lines (in file order), eval.json results (oldest first) and
    recorded starts."""

    path: Path
    config: dict[str, Any]
    lines: list[dict[str, Any]]
    results: list[dict[str, Any]] = field(default_factory=list)
    starts: list[dict[str, Any]] = field(default_factory=list)
    unreadable: int = 0  # metrics lines cut short by a crash

    @property
    def evals(self) -> dict[str, dict[str, Any]]:
        """eval.json kind -> its headline result (the teacher's on all the data), the one the tables show."""
        return headlines(self.results)

    @property
    def kind(self) -> str:
        """"pretrain" or "semi"."""
        return "semi" if "num_labels" in self.config else "pretrain"

    @property
    def method(self) -> str:
        return self.config["method"] if self.kind == "pretrain" else "fixmatch"

    @property
    def seed(self) -> int:
        return self.config.get("seed", 0)

    def series(self, key: str) -> dict[int, dict[str, Any]]:
        """step -> the last line at that step holding `key` (a resumed run rewrites the steps since its
        checkpoint: the later line wins), in step order; FixMatch's `final` summary line left out."""
        found = {m["step"]: m for m in self.lines if m.get(key) is not None and not m.get("final")}
        return dict(sorted(found.items()))

    @property
    def steps_per_epoch(self) -> int | None:
        """Read from any pretraining line holding both the step and the epoch (None before the first)."""
        for m in self.lines:
            if m.get("epoch") and m.get("step"):
                return round(m["step"] / m["epoch"])
        return None

    @property
    def progress(self) -> tuple[float, float]:
        """(done, planned): epochs for pretraining, steps for FixMatch; planned is where the run stops
        (its epochs, or max_steps if fewer)."""
        step = max((m["step"] for m in self.lines if isinstance(m.get("step"), int)), default=0)
        c = self.config
        if self.kind == "semi":
            return step, min(c["total_steps"], c.get("max_steps") or c["total_steps"])
        spe = self.steps_per_epoch
        if spe is None:
            return 0, c["epochs"]
        stop = min(c["epochs"] * spe, c.get("max_steps") or c["epochs"] * spe)
        return step / spe, stop / spe

    @property
    def finished(self) -> bool:
        """Pretraining: the kNN of the last step is logged; FixMatch: the final summary line is."""
        planned = self.progress[1]
        if self.kind == "semi":
            return any(m.get("final") and m["step"] >= planned for m in self.lines)
        spe = self.steps_per_epoch
        return spe is not None and any(s >= round(planned * spe) for s in self.series("knn_top1"))

    def curve(self, key: str | None = None) -> tuple[list[float], list[float]]:
        """The plotted accuracy: kNN top-1 by epoch (pretraining) or teacher top-1 by step (FixMatch); with
        `key`, that metric (e.g. a `TEACHER_STATS` one) on the same axis."""
        key = key or ("teacher_acc" if self.kind == "semi" else "knn_top1")
        s = self.series(key)
        if self.kind == "semi":
            return list(map(float, s)), [m[key] for m in s.values()]
        s = {step: m for step, m in s.items() if isinstance(m.get("epoch"), (int, float))}
        return [m["epoch"] for m in s.values()], [m[key] for m in s.values()]

    def values(self) -> dict[str, float]:
        """Column key -> this run's figure (absent where the run has none)."""
        out: dict[str, float] = {}
        if self.kind == "semi":
            for who in ("teacher", "student"):
                accs = [m[f"{who}_acc"] for m in self.series("teacher_acc").values()]
                if accs:
                    out[f"{who}_median"] = statistics.median(accs[-MEDIAN_OF:])
                    out[f"{who}_last"] = accs[-1]
            return out
        if knn := self.series("knn_top1"):
            out["knn_top1"] = list(knn.values())[-1]["knn_top1"]
        if probe := self.series("probe_top1"):
            out["probe_top1"] = list(probe.values())[-1]["probe_top1"]
        for key, entry in self.evals.items():
            if isinstance(entry, dict) and isinstance(entry.get("top1"), (int, float)):
                out[f"eval:{key}"] = entry["top1"]
        return out


def load_run(path: str | Path) -> Run:
    """Read a run folder; ReportError if it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: no such folder")
    if not (path / "metrics.jsonl").is_file():
        raise ReportError(f"{path}: not a run folder (no metrics.jsonl; give the folders of fastse pretrain / semi)")
    config, starts = _config(path)
    if config is None:
        raise ReportError(f"{path}: holds no run.json and no checkpoint, so its settings are unknown")
    if "num_labels" not in config and config.get("method") not in METHODS:
        raise ReportError(f"{path}: not a pretraining or FixMatch run (its run.json is of "
                          f"{config.get('eval', 'something else')!r})")
    lines, unreadable = [], 0
    for text in (path / "metrics.jsonl").read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            unreadable += 1
            continue
        if isinstance(line, dict) and isinstance(line.get("step"), int):
            lines.append(line)
    return Run(path, config, lines, read_results(path), starts, unreadable)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _config(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(config, starts) from run.json, else the config of the newest checkpoint that has its meta.json; the
    settings of a config saved before a rename under their new names (`fastse.settings.RENAMED`)."""
    info = _json(path / "run.json")
    if isinstance(info, dict) and isinstance(info.get("config"), dict):
        return _renamed(path, info["config"]), list(info.get("starts") or [])
    for meta in sorted((path / "checkpoints").glob("step-*/meta.json"), reverse=True):
        if isinstance(data := _json(meta), dict) and isinstance(data.get("config"), dict):
            return _renamed(path, data["config"]), []
    return None, []


def _renamed(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    try:
        return renamed(config, where=f"{path}: ")
    except ValueError as e:  # both names of one setting, with different values
        raise ReportError(str(e)) from None


# ---------------------------------------------------------------------------------------- tables


@dataclass
class Group:
    """Runs that differ only in the seed: one table row."""

    key: tuple
    runs: list[Run]
    label: str = ""

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    def stat(self, column: str) -> tuple[float, float | None, int] | None:
        """(mean, sample std or None for one value, number of runs with a value) of `column`."""
        values = [v for r in self.runs if (v := r.values().get(column)) is not None]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)

    def curve(self, key: str | None = None) -> tuple[list[float], list[float], list[float], list[float]]:
        """(x, mean, min, max) across the runs at every x where any run has a value (of `key`: `Run.curve`)."""
        at: dict[float, list[float]] = {}
        for run in self.runs:
            for x, y in zip(*run.curve(key)):
                at.setdefault(x, []).append(y)
        xs = sorted(at)
        return xs, [statistics.fmean(at[x]) for x in xs], [min(at[x]) for x in xs], [max(at[x]) for x in xs]


@dataclass
class Table:
    """The groups of one kind and method, with the columns they have figures for."""

    kind: str
    method: str
    groups: list[Group]

    @property
    def title(self) -> str:
        return METHOD_NAMES.get(self.method, self.method)

    @property
    def slug(self) -> str:
        return f"{self.kind}-{self.method}"

    @property
    def metric(self) -> str:
        """The main column: what the plot shows and what "vs EMA" compares."""
        return "teacher_median" if self.kind == "semi" else "knn_top1"

    def columns(self) -> list[tuple[str, str]]:
        """(key, header) of every figure column, in order."""
        if self.kind == "semi":
            median = f"(median of last {MEDIAN_OF})"
            return [("teacher_median", f"teacher top-1 {median}"), ("teacher_last", "teacher top-1 (last)"),
                    ("student_median", f"student top-1 {median}")]
        evals = sorted({k for g in self.groups for r in g.runs for k in r.values() if k.startswith("eval:")})
        probe = [("probe_top1", "online probe top-1")] * any("probe_top1" in r.values() for g in self.groups
                                                              for r in g.runs)
        return [("knn_top1", "kNN top-1"), *probe] + [(k, eval_name(k[5:])) for k in evals]

    def baseline(self, group: Group) -> Group | None:
        """The EMA group with the same settings as `group` but the teacher rule (None for EMA rows)."""
        if group.config.get("rule") == "ema":
            return None
        same = [g for g in self.groups if g.config.get("rule") == "ema" and
                _without(g.key, TEACHER) == _without(group.key, TEACHER)]
        return same[0] if len(same) == 1 else None

    def shared(self) -> dict[str, Any]:
        """The settings of SHARED that every row has alike (None values left out)."""
        out = {}
        for name in SHARED[self.kind]:
            values = {json.dumps(g.config.get(name)) for g in self.groups}
            if len(values) == 1 and (v := self.groups[0].config.get(name)) is not None:
                out[name] = v
        return out


def eval_name(kind: str) -> str:
    """The column header of an eval.json kind: `kNN top-1 (fastse knn)`, `linear fast top-1`."""
    return EVAL_NAMES.get(kind, f"linear {kind} top-1")


def _key(config: dict[str, Any]) -> tuple:
    """What makes runs the same experiment: every setting but the seed and bookkeeping (and, under EMA,
    keep_prob and granularity, which it does not use)."""
    skip = BOOKKEEPING | ({"keep_prob", "granularity"} if config.get("rule") == "ema" else set())
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.items() if k not in skip))


def _without(key: tuple, names: Iterable[str]) -> tuple:
    return tuple(kv for kv in key if kv[0] not in names)


def teacher_label(config: dict[str, Any]) -> str:
    """`ema`, or `sts p=0.7 tensor` / `se p=0.7 element`."""
    rule = config.get("rule", "?")
    return rule if rule == "ema" else f"{rule} p={config.get('keep_prob')} {config.get('granularity')}"


def build_tables(runs: list[Run]) -> list[Table]:
    """Group `runs` (seeds of one experiment together) into one table per kind and method, in the order
    the runs come; each group labelled by what differs from the other groups of its table."""
    tables: dict[tuple[str, str], Table] = {}
    for run in runs:
        table = tables.setdefault((run.kind, run.method), Table(run.kind, run.method, []))
        key = _key(run.config)
        group = next((g for g in table.groups if g.key == key), None)
        if group is None:
            table.groups.append(group := Group(key, []))
        group.runs.append(run)
    for table in tables.values():
        configs = [g.config for g in table.groups]
        names = sorted({k for g in table.groups for k, _ in g.key})
        differ = [k for k in names if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
        for g in table.groups:
            g.runs.sort(key=lambda r: r.seed)
            other = [f"{k}={g.config.get(k)}" for k in differ if k not in TEACHER]
            show_teacher = not other or any(k in TEACHER for k in differ)
            g.label = " ".join(([teacher_label(g.config)] if show_teacher else []) + other)
    return list(tables.values())


# -------------------------------------------------------------------------------------- markdown


def _fmt(stat: tuple[float, float | None, int] | None, n: int) -> str:
    if stat is None:
        return "–"
    mean, std, k = stat
    text = f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
    return text if k == n else f"{text} ({k} of {n} runs)"


def _delta(group: Group, base: Group | None, column: str) -> tuple[str, float, bool | None]:
    """(text, difference of means from the EMA row, whether it is beyond the noise: None where unknown).
    The standard error is sqrt(s1²/n1 + s2²/n2); a row of one seed borrows the EMA row's std, where that
    row has two seeds or more."""
    a, b = group.stat(column), base.stat(column) if base else None
    if a is None or b is None:
        return "–", math.nan, None
    delta, std_a, n_a = a[0] - b[0], a[1], a[2]
    borrowed = std_a is None and b[1] is not None
    if borrowed:
        std_a = b[1]
    if std_a is None or b[1] is None:
        return f"{delta:+.2f} (one seed: noise unknown)", delta, None
    se = math.sqrt(std_a ** 2 / n_a + b[1] ** 2 / b[2])
    beyond = abs(delta) > 2 * se
    verdict = ("beyond the noise" if beyond else "inside the noise") + ("; EMA seeds spread" if borrowed else "")
    return f"{delta:+.2f} ± {se:.2f} ({verdict})", delta, beyond


def _claim(group: Group, method: str, delta: float, beyond: bool | None) -> tuple[str, str]:
    """(the paper's claim for the row's rule against EMA, whether this row agrees)."""
    rule = group.config.get("rule")
    if rule not in CLAIMS:
        return "–", "–"
    claim = CLAIMS[rule] + CLAIMED_FIGURES.get((rule, method), "")
    if math.isnan(delta):
        return claim, "–"
    if beyond is None:
        return claim, "cannot tell (one seed)"
    side = "above" if delta > 0 else "below"
    if CLAIMS[rule].startswith("above"):
        return claim, ("yes" if side == "above" else "no: below") if beyond else "no: inside the noise"
    return claim, f"no: {side}" if beyond else "yes: inside the noise"


def _num(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


def _progress(group: Group) -> str:
    done = sorted({round(r.progress[0], 2) for r in group.runs})
    planned = max(r.progress[1] for r in group.runs)
    if done == [round(planned, 2)]:
        return _num(planned)
    return ("–".join(map(_num, (done[0], done[-1]))) if len(done) > 1 else _num(done[0])) + f" of {_num(planned)}"


def _starts(runs: Iterable[Run], key: str) -> str:
    values = sorted({str(s.get(key)) for r in runs for s in r.starts if s.get(key)})
    if key == "commit":
        values = sorted({v[:10] + ("-dirty" if v.endswith("-dirty") else "") for v in values})
    return ", ".join(values) or "not recorded"


def command_line(run: Run) -> str | None:
    """The command of the run's latest start: `fastse ...` (the command line, however started) or
    `python3 script.py ...`; None where it is not known (no run.json, or started from Python code)."""
    argv = list(run.starts[-1].get("argv") or [""]) if run.starts else [""]
    if Path(argv[0]).name == "fastse" or argv[0].endswith("cli/main.py"):
        return shlex.join(["fastse", *argv[1:]])
    return shlex.join(["python3", *argv]) if argv[0].endswith(".py") else None


def markdown(tables: list[Table], title: str, images: dict[str, str] | None = None) -> str:
    """The report: per table the shared settings, one row per group, the plot (`images`: slug -> file
    name) and the runs with their device, commit and command."""
    out = [f"# {title}", ""]
    for t in tables:
        cols = t.columns()
        with_delta = any(t.baseline(g) for g in t.groups)
        unit = "epochs" if t.kind == "pretrain" else "steps"
        out += [f"## {t.title}", ""]
        if shared := t.shared():
            out += ["Shared settings: " + ", ".join(f"{k}={v}" for k, v in shared.items()) + ".", ""]
        header = ["run", "seeds", unit, *[h + " %" for _, h in cols[:1]]]
        header += [f"{cols[0][1]}: vs EMA", "paper", "agrees"] * with_delta + [h + " %" for _, h in cols[1:]]
        header += ["GPU", "commit"]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for g in t.groups:
            n = len(g.runs)
            cells = [g.label, ", ".join(str(r.seed) for r in g.runs), _progress(g), _fmt(g.stat(cols[0][0]), n)]
            if with_delta:
                text, delta, beyond = _delta(g, t.baseline(g), t.metric)
                cells += [text, *_claim(g, t.method, delta, beyond)]
            cells += [_fmt(g.stat(k), n) for k, _ in cols[1:]] + [_starts(g.runs, "device"), _starts(g.runs, "commit")]
            out.append("| " + " | ".join(cells) + " |")
        out += ["", "Mean ± sample standard deviation across seeds (the std only with 2 or more seeds)."]
        if with_delta:
            out.append("vs EMA: difference of means from the EMA row with the same settings, ± its standard error "
                       "sqrt(s1²/n1 + s2²/n2); inside the noise where |difference| <= 2 standard errors; a row of "
                       "one seed takes the EMA seeds' std as its own. paper: what Huang et al. (NeurIPS 2021) "
                       "claim for the rule against EMA; agrees: whether this row bears it out beyond the noise.")
        if images and t.slug in images:
            out += ["", f"![{t.title}]({images[t.slug]})"]
        out += ["", "Runs:", ""]
        for g in t.groups:
            for r in g.runs:
                figures = ", ".join(f"{h} {v:.2f}" for k, h in cols if (v := r.values().get(k)) is not None)
                done, planned = r.progress
                notes = [f"{_num(done)} of {_num(planned)} {unit}"] * (not r.finished)
                notes += [f"{r.unreadable} unreadable metrics line(s)"] * bool(r.unreadable)
                notes += [f"not in the table: {eval_name(e['kind'])} {e['top1']:.2f} ({qualifiers(e)})"
                          for e in r.results if not is_headline(e) and isinstance(e.get("top1"), (int, float))]
                cmd = command_line(r)
                out.append(f"- `{r.path}` ({g.label}, seed {r.seed}): {figures or 'no figures yet'}"
                           + "".join(f"; {x}" for x in notes)
                           + f"; {_starts([r], 'device')}; commit {_starts([r], 'commit')}"
                           + (f"; `{cmd}`" if cmd else ""))
        out.append("")
    return "\n".join(out).rstrip("\n")


# ----------------------------------------------------------------------------------------- plots


def plot(table: Table, path: str | Path) -> Path:
    """Draw `table`'s main accuracy curve (kNN top-1 by epoch, or teacher top-1 by step), one line per
    group (the mean across seeds) with its lowest-to-highest band, into the PNG file `path`; below it, where
    the runs logged them, the teacher's momentum, updated fraction and distance to the student
    (`TEACHER_STATS`, at every metrics line) on the same axis, one panel each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = [k for k in TEACHER_STATS if any(g.curve(k)[0] for g in table.groups)]
    fig = Figure(figsize=(7, 6.6 if stats else 4.2), dpi=120)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if stats else 1, max(len(stats), 1), height_ratios=[2.2, 1] if stats else None)
    ax = fig.add_subplot(grid[0, :])
    semi = table.kind == "semi"
    for i, key in enumerate(stats):
        panel = fig.add_subplot(grid[1, i])
        for j, g in enumerate(table.groups):  # colour j: the group's colour in every panel
            xs, mean, low, high = g.curve(key)
            panel.plot(xs, mean, linewidth=1, color=f"C{j}")
            if len(g.runs) > 1:
                panel.fill_between(xs, low, high, color=f"C{j}", alpha=0.2, linewidth=0)
        panel.set_xlabel("step" if semi else "epoch", fontsize=8)
        panel.set_title(TEACHER_STATS[key], fontsize=8)
        panel.tick_params(labelsize=7)
        panel.grid(alpha=0.3)
    for j, g in enumerate(table.groups):
        xs, mean, low, high = g.curve()
        if not xs:
            continue
        ax.plot(xs, mean, marker="o" if len(xs) < 30 else None, markersize=3, color=f"C{j}",
                label=f"{g.label} (n={len(g.runs)})")
        if len(g.runs) > 1:
            ax.fill_between(xs, low, high, color=f"C{j}", alpha=0.2, linewidth=0)
    ax.set_xlabel("step" if semi else "epoch")
    ax.set_ylabel("teacher test top-1 (%)" if semi else "teacher kNN top-1 (%)")
    ax.set_title(f"{table.title}: mean over seeds, band from lowest to highest", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


# ---------------------------------------------------------------------------------------- report


def write_report(run_dirs: Iterable[str | Path], out: str | Path, *, title: str = "fastse results"
                 ) -> tuple[Path, str]:
    """Read the run folders, write `out/report.md` and one PNG per table; return (report path, markdown)."""
    runs, seen = [], set()
    for d in run_dirs:
        if (resolved := Path(d).resolve()) in seen:
            raise ReportError(f"{d}: given twice")
        seen.add(resolved)
        runs.append(load_run(d))
    if not runs:
        raise ReportError("no run folders given")
    if not str(out).strip():
        raise ReportError("--out='' names no folder: give the folder for report.md")
    out = Path(out)
    tables = build_tables(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        images = {t.slug: plot(t, out / f"{t.slug}.png").name for t in tables}
        text = markdown(tables, title, images)
        (out / "report.md").write_text(text + "\n")
    except OSError as e:
        what = "a file, not a folder" if out.is_file() else f"a folder that cannot be written ({e.strerror or e})"
        raise ReportError(f"{out}: --out is {what}") from None
    return out / "report.md", text
