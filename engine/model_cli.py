"""`framewatch train`, `eval`, `promote` and `label`: the corruption model's life cycle from the command line.

The loop: alerts keep their picture in the review store -> operators give verdicts (`label`) -> `train
--include-feedback` fine-tunes a candidate from the current weights -> `eval --against` compares it with the
current model on held-out data -> `promote` installs it only when it is not worse, and running engines pick it
up by themselves (they watch the weights file)."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 130)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 130)

CANDIDATE = Path("framewatch-out/models/candidate.pt")
REVIEW = Path("framewatch-out/review")


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"framewatch: error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _shipped() -> Path:
    from models.weights import SHIPPED

    return SHIPPED


def _train_config(path: Path | None, overrides: dict[str, Any]):
    from models.train import TrainConfig

    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise _fail(f"{path}: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise _fail(f"{path}: a training config is a mapping of TrainConfig fields")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise _fail(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "crop" in values:
        values["crop"] = tuple(values["crop"])
    try:
        cfg = TrainConfig(**values)
        cfg.check()
    except (TypeError, ValueError) as exc:
        raise _fail(f"training config: {exc}") from None
    return cfg


def _recipe(path: Path | None):
    """A data recipe file (JSON or YAML of models.data.generate.Recipe fields), or None for the default recipe."""
    if path is None:
        return None
    from models.data.generate import Recipe

    try:
        data = yaml.safe_load(path.read_text())
        return Recipe.from_json(data.get("recipe", data))
    except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError, AttributeError) as exc:
        raise _fail(f"{path}: not a data recipe: {str(exc).splitlines()[0]}") from None


RecipeOpt = Annotated[Path | None, typer.Option("--recipe", help="data recipe file (JSON/YAML; default: the built-in recipe)")]
DataRootOpt = Annotated[Path | None, typer.Option("--data-root", help="where generated data sets live (default ~/.cache/framewatch/corruption)")]


def train(
    config: Annotated[Path | None, typer.Option("--config", help="YAML of TrainConfig fields (epochs, batch, lr, ...)")] = None,
    include_feedback: Annotated[bool, typer.Option("--include-feedback", help="fine-tune the current model on the review store's verdicts plus the generated data")] = False,
    review: Annotated[Path, typer.Option(help="review store with operators' verdicts")] = REVIEW,
    init: Annotated[Path | None, typer.Option(help="weights to start from (default with --include-feedback: the shipped model)")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="where to write the new weights")] = CANDIDATE,
    epochs: Annotated[int | None, typer.Option(min=1, help="passes over the training data")] = None,
    minutes: Annotated[float | None, typer.Option(min=0.1, help="wall-clock cap")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N]")] = None,
    recipe: RecipeOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Train the corruption CNN (on a GPU when there is one). Builds the data set on first use."""
    from models.data.content import SourceError
    from models.train import train_and_save
    from models.weights import WeightsError

    r = _recipe(recipe)
    overrides: dict[str, Any] = {"epochs": epochs, "minutes": minutes, "device": device, "output": str(output),
                                 "recipe": r.to_json() if r is not None else None,
                                 "data_root": str(data_root) if data_root else None}
    if include_feedback:
        from engine.review import ReviewStore

        n = len([r for r in ReviewStore(review).records() if r.verdict is not None])
        if n == 0:
            raise _fail(f"no labelled alerts in the review store {review}; give verdicts with `framewatch label` first")
        overrides["feedback"] = str(review)
        overrides["init"] = str(init or _shipped())
    elif init is not None:
        overrides["init"] = str(init)
    cfg = _train_config(config, overrides)
    if include_feedback and epochs is None and config is None:
        # Fine-tuning: a few passes at a lower rate, so the verdicts adjust the model without it forgetting.
        cfg.epochs, cfg.lr = 4, cfg.lr / 4
    try:
        res = train_and_save(cfg, progress=lambda s: err.print(f"train: {s}", markup=False))
    except (WeightsError, FileNotFoundError, SourceError) as exc:
        raise _fail(str(exc)) from None
    err.print(f"wrote {res.path} (version {res.meta.version}, threshold {res.meta.threshold:.3f}, "
              f"validation F1 {res.meta.metrics.get('val_f1', float('nan')):.4f})", markup=False)


def _root(p: Path | None) -> str | None:
    return str(p) if p is not None else None


def _difference(res: dict) -> str:
    """The paired F1 difference of a comparison, in words."""
    d = res.get("f1_difference")
    if not d:
        return ""
    lo, hi = d["ci95"]
    return (f"F1 difference (candidate - current) {d['difference']:+.4f}, 95 % {lo:+.4f} to {hi:+.4f} (paired bootstrap "
            f"over decodes; candidate ahead in {d['a_ahead']:.0%} of draws)")


def _eval_table(title: str, reports: list[tuple[str, dict]]) -> Table:
    t = Table(title=title)
    t.add_column("model")
    for c in ("rule", "precision", "recall", "F1", "F1 95 % (by decode)", "AP", "packet-loss F1", "clean real clips: false frames", "events"):
        t.add_column(c, justify="right")
    for name, r in reports:
        o = r["overall"]
        c = r.get("clean_real_clips_whole", r["clean_real_clips"])
        ci = o.get("f1_ci95")
        t.add_row(name, r.get("rule", "frame"), f"{o['precision']:.4f}", f"{o['recall']:.4f}", f"{o['f1']:.4f}",
                  f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "-",
                  f"{o['average_precision']:.4f}", f"{r['packet_loss']['f1']:.4f}", f"{c['false_alarm_frames']}/{c['frames']}",
                  str(c.get("events", "-")))
    return t


def _note_other_data(weights: Path, split: str, digest: str | None) -> None:
    """Says so when the figures recorded in the weights were measured on other bytes than these (a data set built
    by an older data format or another build), so nobody compares the two as if they were one measurement."""
    from models.weights import WeightsError, load

    try:
        recorded = (load(weights)[1].metrics or {}).get(split, {}).get("data_digest")
    except WeightsError:
        return
    if recorded and digest and recorded != digest:
        out.print(f"note: these {split} data (digest {digest}) are not those the figures recorded in {weights.name} were "
                  f"measured on ({recorded}): compare the two models on this build, not with the recorded figures")


def evaluate(
    weights: Annotated[Path | None, typer.Argument(help="weights file (default: the shipped model)")] = None,
    against: Annotated[Path | None, typer.Option(help="compare with this (current) model on the same frames")] = None,
    split: Annotated[str, typer.Option(help="test (held out), val or train")] = "test",
    out_dir: Annotated[Path, typer.Option("--out", help="folder for eval.json / compare.json and the PR curve PNG")] = Path("framewatch-out/eval"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON report on stdout")] = False,
    record: Annotated[bool, typer.Option("--record", help="store the results in the weights file's metadata")] = False,
    recipe: RecipeOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Precision, recall, F1, PR curve (PNG), per damage kind, per source and per codec, as JSON: the model run as
    the engine runs it over whole held-out decodes, with its decision rule."""
    from models import evaluate as ev
    from models.weights import WeightsError

    weights = weights or _shipped()
    try:
        from models.weights import load

        load(weights)  # both files checked before minutes of scoring
        if against is not None:
            load(against)
            res = ev.compare(weights, against, split, out_dir, _recipe(recipe), _root(data_root), device=device)
            rows = [(f"candidate {res['candidate']['version']}", res["candidate"]), (f"current {res['current']['version']}", res["current"])]
        else:
            res = ev.evaluate(weights, split, out_dir, _recipe(recipe), _root(data_root), device=device)
            rows = [(res["model"]["version"], res)]
        if record:  # the first model's results (the candidate's, with --against: the same report as alone)
            from models.weights import record_metrics

            first = rows[0][1]
            record_metrics(weights, split, {k: first[k] for k in ("frames", "corrupt_frames", "threshold", "rule", "overall",
                                                                   "packet_loss", "per_kind", "per_source", "clean_real_clips",
                                                                   "all_labelled", "clean_real_clips_whole", "episodes",
                                                                   "data_digest")})
    except (WeightsError, ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        sys.stdout.write(json.dumps(res) + "\n")
        return
    out.print(_eval_table(f"corruption model on the {split} split", rows))
    _note_other_data(weights, split, rows[0][1].get("data_digest"))
    per = rows[0][1]["per_kind"]
    t = Table(title="per damage kind (first model)")
    for c in ("kind", "precision", "recall", "F1", "false frames"):
        t.add_column(c)
    for kind, r in per.items():
        t.add_row(kind, *(f"{r[k]:.4f}" if k in r else "-" for k in ("precision", "recall", "f1")), str(r.get("fp", r.get("false_alarm_frames", "-"))))
    out.print(t)
    for name, r in rows:
        e = r["episodes"]
        if e["episodes"]:
            lat = e.get("latency_ms", {})
            out.print(f"{name}: damage episodes met {e['detected']} of {e['episodes']} ({e['share']:.1%}); first decision "
                      f"after {lat.get('median', float('nan')):.0f} ms median, {lat.get('p90', float('nan')):.0f} ms p90, "
                      f"{lat.get('max', float('nan')):.0f} ms at most; missed episodes' lengths (pictures): {e['missed_lengths']}")
    if against is not None:
        verdict = "not worse: may be promoted" if res["better_or_equal"] else "worse: " + "; ".join(res["reasons"])
        out.print(f"candidate is {verdict}")
        out.print(_difference(res))
    out.print(f"report: {out_dir}  PR curve: {res.get('pr_curve_png')}")


def calibrate(
    weights: Annotated[Path, typer.Argument(help="weights file to calibrate")],
    tta: Annotated[str | None, typer.Option(help="test-time views: none, mirror, rot180 or mirror+rot180 (default: the file's own)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="where to write the result (default: a candidate beside it)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    recipe: RecipeOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Choose a model's decision threshold again on the validation split (the best F1 under its decision rule), with
    the test-time views given: what training does at its end, for weights whose views or data changed since. The
    held-out split is not looked at; `eval` and `promote` judge the result."""
    import datetime as dt

    from models import evaluate as ev
    from models.data.generate import Recipe, build
    from models.data.sequences import EVIDENCE
    from models.net import VIEWS
    from models.train import MODEL_VERSION, pick_device
    from models.weights import WeightsError, load, save

    if tta is not None and tta not in VIEWS:
        raise _fail(f"--tta must be one of {', '.join(VIEWS)}, not {tta!r}")
    target = output or weights.with_name(weights.stem + ".calibrated" + weights.suffix)
    try:
        model, meta = load(weights, pick_device(device))
        if tta is not None:
            model.tta = meta.tta = tta
        r = _recipe(recipe) or Recipe()
        cal = ev.calibrate(model, meta, r, build(r, Path(data_root) if data_root else None), tuple(dict.fromkeys(("frame", meta.decision))))
    except (WeightsError, ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    old = meta.threshold
    # Other views or another threshold decide otherwise: events name the new version; the weights are the parent's.
    meta.parent, meta.version = meta.version, dt.datetime.now(dt.UTC).strftime(f"{MODEL_VERSION}.%Y%m%d%H%M%S")
    meta.threshold, val_f1 = cal[meta.decision]
    meta.metrics = {**meta.metrics, "val_f1": val_f1, "frame_rule_threshold": cal["frame"][0], "frame_rule_val_f1": cal["frame"][1],
                    "calibrated": {"recipe_hash": r.hash, "tta": meta.tta, "previous_threshold": old},
                    "evidence": EVIDENCE}  # the loss evidence version the threshold was chosen with
    meta.metrics.pop("test", None)  # measured with the old threshold or views: `eval --record` measures again
    save(model.cpu(), meta, target)
    err.print(f"wrote {target} (version {meta.version}, the weights of {meta.parent}): views {meta.tta}, threshold {old:.4f} -> {meta.threshold:.4f} "
              f"(validation F1 {val_f1:.4f}, {meta.decision})", markup=False)


def promote(
    candidate: Annotated[Path, typer.Argument(help="candidate weights (from `framewatch train`)")] = CANDIDATE,
    current: Annotated[Path | None, typer.Option(help="the weights file engines use (default: the shipped model)")] = None,
    force: Annotated[bool, typer.Option("--force", help="install even when the candidate is worse")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    recipe: RecipeOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Install a candidate model where engines load it from, only if it is not worse than the current one on the
    held-out data. Running engines reload it within seconds."""
    from models import evaluate as ev
    from models.weights import WeightsError, load

    current = current or _shipped()
    if current.is_dir():
        raise _fail(f"--current {current} is a directory, not a weights file")
    if not current.parent.is_dir():
        raise _fail(f"--current {current}: folder {current.parent} does not exist")
    try:
        load(candidate)
        comparable = current.is_file()
        if comparable:
            try:
                load(current)
            except WeightsError as exc:
                if not force:
                    raise WeightsError(f"{exc}; --force replaces it without a comparison") from None
                comparable = False  # a damaged current model is what --force is for
        res = (ev.compare(candidate, current, "test", Path("framewatch-out/eval"), _recipe(recipe), _root(data_root), device=device)
               if comparable else None)
    except (WeightsError, ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    if res is not None and not res["better_or_equal"] and not force:
        raise _fail("refused: the candidate is worse than the current model (" + "; ".join(res["reasons"]) + ")", code=1)
    tmp = current.with_suffix(current.suffix + ".tmp")
    try:
        if current.is_file():
            backup = current.with_name(current.stem + ".previous" + current.suffix)
            shutil.copy2(current, backup)
        shutil.copy2(candidate, tmp)
        tmp.replace(current)  # atomic: an engine re-reading the file never sees half of it
        if candidate.with_suffix(".json").is_file():
            shutil.copy2(candidate.with_suffix(".json"), current.with_suffix(".json"))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _fail(f"cannot install {candidate} as {current}: {exc.strerror or exc}") from None
    f1 = f" (F1 {res['candidate']['overall']['f1']:.4f} vs {res['current']['overall']['f1']:.4f})" if res else ""
    err.print(f"promoted {candidate} -> {current}{f1}", markup=False)
    if res:
        err.print(_difference(res), markup=False)


def label(
    alert_ids: Annotated[list[str] | None, typer.Argument(help="corruption alert ids (from the event's id)")] = None,
    true: Annotated[bool, typer.Option("--true", help="the alert was right: the picture is corrupt")] = False,
    false: Annotated[bool, typer.Option("--false", help="the alert was wrong: the picture is fine")] = False,
    from_file: Annotated[Path | None, typer.Option("--file", help="bulk: CSV lines 'alert_id,true|false'")] = None,
    review: Annotated[Path, typer.Option(help="review store folder")] = REVIEW,
    list_: Annotated[bool, typer.Option("--list", help="list the stored alerts and their verdicts")] = False,
) -> None:
    """Record operators' verdicts on corruption alerts (one, several, or a CSV file), or list the store."""
    from engine.review import ReviewError, ReviewStore

    store = ReviewStore(review)
    if list_:
        if not review.is_dir():
            raise _fail(f"no review store at {review}")
        t = Table(title=f"review store {review}")
        for c in ("alert", "stream", "start s", "probability", "model", "verdict"):
            t.add_column(c)
        for r in store.records():
            t.add_row(r.alert_id, r.stream, f"{r.start:.2f}", "-" if r.probability is None else f"{r.probability:.3f}",
                      r.model_version or "-", "-" if r.verdict is None else str(r.verdict).lower())
        out.print(t)
        return
    pairs: list[tuple[str, bool]] = []
    if from_file is not None:
        try:
            # utf-8-sig: spreadsheets save CSV with a byte-order mark, which would stick to the first id.
            with from_file.open(encoding="utf-8-sig") as fh:
                for n, row in enumerate(csv.reader(fh), 1):
                    if not row or row[0].startswith("#"):
                        continue
                    if len(row) != 2 or row[1].strip().lower() not in ("true", "false"):
                        raise _fail(f"{from_file}:{n}: expected 'alert_id,true|false'")
                    pairs.append((row[0].strip(), row[1].strip().lower() == "true"))
        except OSError as exc:
            raise _fail(f"{from_file}: {exc}") from None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise _fail(f"{from_file}: not a UTF-8 CSV file ({type(exc).__name__})") from None
    if alert_ids:
        if true == false:
            raise _fail("give exactly one of --true or --false")
        pairs.extend((a, true) for a in alert_ids)
    if not pairs:
        raise _fail("nothing to label: give alert ids with --true/--false, or --file")
    failed = 0
    for alert_id, verdict in pairs:
        try:
            store.label(alert_id, verdict)
            err.print(f"{alert_id}: {'true' if verdict else 'false'}", markup=False)
        except ReviewError as exc:
            err.print(f"framewatch: error: {exc}", markup=False)
            failed += 1
    if failed:
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command("eval")(evaluate)
    app.command()(calibrate)
    app.command()(promote)
    app.command()(label)
