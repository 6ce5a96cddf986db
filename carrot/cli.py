"""``carrot-run``: thin click commands over :mod:`carrot.run.commands`.

Exit codes: 0 success; 2 a user mistake (bad path, option, config or input) or an environment that
refuses the work (permissions, full disk, too little memory), reported on one line; 1 an unexpected
internal error (with traceback, please report it); 130 interrupted (cached work resumes).
"""
from __future__ import annotations

import errno
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from carrot.config import DEFAULT_BLOCK, DEFAULT_PERMUTATIONS, DEFAULT_REMOVAL, MAX_PLAYERS, REMOVALS
from carrot.errors import CarrotError

EXIT_USER_ERROR = 2


# what the user's file system refuses (permissions, read-only or full disk, names, links, quotas, I/O)
FILESYSTEM_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
                     errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ELOOP, errno.EFBIG, errno.EIO, errno.EMFILE,
                     errno.ENFILE, errno.ENOTEMPTY, errno.EBUSY, errno.ETXTBSY, errno.ENOENT)


def _one_line(text: str) -> str:
    """One terminal line: whitespace runs as one space, control characters and undecodable bytes of user names
    escaped (:func:`carrot.text.for_terminal`)."""
    from carrot.text import for_terminal

    return for_terminal(" ".join(str(text).split()))


def _echo(line: str) -> None:
    """A result line on stdout, made safe for the terminal (the names in it are the user's data)."""
    from carrot.text import for_terminal

    click.echo(for_terminal(line))


def _short_write(exc: OSError) -> bool:
    """A write that stopped short without an errno (safetensors' "N requested and M written"): the disk filled."""
    import re

    return exc.errno is None and re.search(r"\d+ requested and \d+ written", str(exc)) is not None


def user_errors(fn: Callable) -> Callable:
    """Turn :class:`CarrotError`, what the file system refuses (permissions, full disk, long names...) and
    running out of memory into a one-line message and exit code 2; an interrupt into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import warnings

        from carrot.errors import CarrotWarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
            if issubclass(category, CarrotWarning):
                click.echo(f"carrot-run: warning: {_one_line(message)}", err=True)
            else:
                _default_show(message, category, filename, lineno, file, line)

        _default_show = warnings.showwarning
        warnings.showwarning = show
        from carrot.progress import set_quiet

        set_quiet(bool(kwargs.get("quiet", False)))  # one switch silences every bar and stage note of the command
        try:
            return fn(*args, **kwargs)
        except CarrotError as exc:
            _fail(str(exc))
        except OSError as exc:
            if _short_write(exc):
                _fail(f"No space left on device (a write stopped short: {exc}); free space and run the command again")
            if exc.errno not in FILESYSTEM_ERRNOS:
                raise
            where = f": '{exc.filename}'" if exc.filename else ""
            _fail(f"{exc.strerror or exc}{where}")
        except MemoryError:
            _fail("out of memory; lower backbone.batch_size or backbone.img_size, or use a machine with more memory")
        except KeyboardInterrupt:
            click.echo("carrot-run: interrupted; cached work is kept and resumes on the next run", err=True)
            sys.exit(130)
        finally:
            warnings.showwarning = _default_show

    return wrapper


def _fail(message: str) -> None:
    click.echo(f"carrot-run: error: {_one_line(message)}", err=True)
    sys.exit(EXIT_USER_ERROR)


class CarrotGroup(click.Group):
    """click's group with its usage errors (bad option, missing argument, wrong type) on one line, as
    carrot's own errors are, exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `carrot-run`: the help, as click prints it
            click.echo(exc.ctx.get_help() if exc.ctx is not None else str(exc), err=True)
            sys.exit(EXIT_USER_ERROR)
        except click.exceptions.UsageError as exc:
            cmd = exc.ctx.command_path if exc.ctx is not None else "carrot-run"
            hint = f" (see '{cmd} --help')"
            _fail(f"{exc.format_message()}{hint}")
        except click.exceptions.ClickException as exc:
            _fail(exc.format_message())
        except click.exceptions.Abort:
            click.echo("carrot-run: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


class FiniteRange(click.FloatRange):
    """click's FloatRange that also refuses NaN and infinities (which compare False with every bound)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        import math

        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


FRACTION = FiniteRange(0, 1, min_open=True, max_open=True)


def _num_or(word: str, name: str, v: str | None, kind: type = float) -> float | str | None:
    """A flag that takes a number (``kind``: float, or int for an integer) or one keyword (``median``/``median*k``,
    ``auto``)."""
    if v is None or v == word or (word == "median" and v.startswith("median*")):
        return v
    try:
        return kind(v)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise CarrotError(f"--{name}: expected {what} or '{word}', got {v!r}") from None


def _numbers(name: str, text: str, kind: type = int, minimum: int = 1) -> list:
    """A comma-separated list flag (``--k 1,5,10``) parsed as ``kind`` (integers >= ``minimum``), or a one-line error."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CarrotError(f"--{name}: expected comma-separated {'integers' if kind is int else 'numbers'}, got {text!r}") from None
    if not values:
        raise CarrotError(f"--{name}: expected at least one value")
    if kind is int and min(values) < minimum:
        raise CarrotError(f"--{name}: expected integers >= {minimum}, got {text!r}")
    return values


def _echo_audit(name: str, result: Any) -> None:
    """Print an audit's summary lines, as its registry entry (:mod:`carrot.audit.registry`) writes them."""
    from carrot.audit.registry import get

    click.echo("\n".join(get(name).summary(result)))


def _param(flag: str) -> str:
    """The keyword a config flag arrives as: ``--kernel-approx`` -> ``kernel_approx``."""
    return flag.lstrip("-").replace("-", "_")


def _option(key: str, f: Any) -> Callable:
    """The click option of config key ``key`` (its field ``f``): flag, parsing and help from the field
    (:func:`carrot.config.setting`)."""
    flag, cli, choices, text = f.metadata["flag"], f.metadata["cli"], f.metadata["choices"], f.metadata["help"]
    types: dict[str, Any] = {
        "int": int, "str": str, "choice": click.Choice(choices), "dir": click.Path(exists=True, file_okay=False),
        "file": click.Path(exists=True, dir_okay=False), "out_dir": click.Path(file_okay=False), "fraction": FRACTION,
        "nonneg": FiniteRange(min=0), "auto": str, "auto_int": str, "median": str,
    }
    if "default" not in text.lower():  # the flags default to None (the config decides); say what that is
        text += f" [default: {'none' if f.default is None else str(f.default).lower() if cli == 'bool' else f.default}]"
    if cli == "bool":
        return click.option(f"{flag}/--no-{flag[2:]}", _param(flag), default=None, help=text)
    return click.option(flag, _param(flag), type=types[cli], help=text)


def run_options(fn: Callable) -> Callable:
    """Options shared by every command that builds a run configuration: ``--config``, and one flag per config key
    that has one, generated from the config's fields (their help is the fields' own)."""
    from carrot.config import config_keys

    opts = [click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                         help="YAML config merged into the defaults; flags override it.")]
    opts += [_option(key, f) for key, f in config_keys() if f.metadata.get("flag")]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def build_config(config_path: str | None = None, **o: Any):
    """The run configuration of a command: the defaults, merged with ``--config``, then with every config flag given
    (``o``: the flags' keywords, as :func:`run_options` names them)."""
    from carrot.config import config_keys, load_config

    params = {_param(f.metadata["flag"]) for _, f in config_keys() if f.metadata.get("flag")}
    unknown = sorted(set(o) - params)
    if unknown:
        raise TypeError(f"build_config: unknown option(s) {unknown}; expected some of {sorted(params)}")
    cfg = load_config(config_path)
    words = {"auto": "auto", "auto_int": "auto", "median": "median"}
    overrides = {}
    for key, f in config_keys():
        flag = f.metadata.get("flag")
        if flag:
            value = o.get(_param(flag))
            kind = f.metadata["cli"]
            overrides[key] = _num_or(words[kind], flag[2:], value, int if kind == "auto_int" else float) if kind in words else value
    if not o.get("data_kind") and o.get("data") and cfg.data.kind == "elpv":  # --data alone: an ImageFolder tree
        overrides["data.kind"] = "imagefolder"
    overrides["data.split_seed"] = o.get("seed")  # --seed seeds the split too
    return cfg.merged(overrides)


@click.group(cls=CarrotGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="carrot")
def cli() -> None:
    """carrot: fine-grained image classification whose predictions decompose exactly into
    training images and image regions.

    \b
    Typical use:
      carrot-run demo                                  # offline, built-in data and backbone
      carrot-run fit --data DATA_ROOT --out runs/a     # ImageFolder tree (other layouts: --data-kind)
      carrot-run explain runs/a IMAGE_OR_FOLDER --top-k 5

    Exit codes: 0 ok, 2 user error (one-line message), 1 internal error, 130 interrupted (cached
    extraction resumes on the next run).
    """


@cli.command()
@run_options
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out (its explanations and reports go too).")
@click.option("--quiet", is_flag=True, help="No progress bars or stage notes.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON on stdout.")
@user_errors
def fit(run_dir: str, overwrite: bool, quiet: bool, as_json: bool, **opts: Any) -> None:
    """Extract (cached) backbone tokens, fit the closed-form head, save a run directory."""
    from carrot.run import commands as orchestration

    cfg = build_config(**opts)
    metrics = orchestration.fit(cfg, run_dir, progress=not quiet, overwrite=overwrite)
    if metrics.get("rank", 0) != 0:  # torchrun worker: rank 0 reports
        return
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
    else:
        _echo(
            f"fitted {metrics['n_train']} images, {metrics['classes']} classes: "
            f"test accuracy {metrics['test_accuracy']:.4f} on {metrics['n_test']} images -> {run_dir}"
        )


@cli.command()
@run_options
@click.option("--quiet", is_flag=True, help="No progress bars or stage notes.")
@user_errors
def extract(quiet: bool, **opts: Any) -> None:
    """Extract (or resume, or reuse) the backbone tokens of the train and test splits into the token
    cache, without fitting; prints the cache folders as JSON."""
    from carrot.run import commands as orchestration

    stores, _, _ = orchestration.extract_splits(build_config(**opts), progress=not quiet)
    click.echo(json.dumps({"train": str(stores[0].path), "test": str(stores[1].path),
                           "n": [len(s) for s in stores], "grid": list(stores[0].grid)}, indent=2))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--t", "ts", default="0,0.25,0.5,1,2,5,10", show_default=True, help="Comma-separated diffusion times to compare.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON file to write (default: RUN_DIR/t_sweep.json, plus .csv).")
@click.option("--pixel-images", type=click.IntRange(min=0), default=0, show_default=True, help="Also measure each t's pixel and token maps by the pixel deletion / insertion protocol on this many test images (whole model re-run).")
@click.option("--quiet", is_flag=True, help="No progress bars or stage notes.")
@user_errors
def bench(run_dir: str, ts: str, out_path: str | None, pixel_images: int, quiet: bool) -> None:
    """Compare diffusion times t on the run's cached tokens (one eigendecomposition per image for all
    t): test accuracy, LOO-chosen lambda and LOO accuracy per t."""
    from carrot.run import commands as orchestration

    _echo_audit("t_sweep", orchestration.bench(run_dir, _numbers("t", ts, float), out_path, pixel_images))


def _block(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"expected auto or an integer >= 1, got {value!r}")
    return int(value)


def _even(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value % 2:
        raise click.BadParameter(f"expected an even number (each order with its reverse), got {value}")
    return value


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Supporting and inhibiting training images to list.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Where to write explanations (default: RUN_DIR/explanations).")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--node-removal", is_flag=True, help="Also remove each region from the graph (logit drops) and draw deletion/insertion curves.")
@click.option("--pixel-map", type=click.Choice(["shapley", "split", "none"]), default="shapley", show_default=True, help="The page's pixel map. shapley: each cell's Shapley value in the game 'remove a set of cells' (sampled orders; the values sum exactly to logit(image) - logit(every cell removed); --permutations x (players - 1) runs of the whole model, batched). split: the whole model's gradient integrated from the fill image (path-integrated gradients; 32 forward + backward passes; --removal blur or mean). none: no pixel map.")
@click.option("--permutations", type=click.IntRange(min=2, max=1000), default=DEFAULT_PERMUTATIONS, show_default=True, callback=_even, help="Random orders the Shapley map samples (even: each order with its reverse); its standard error falls as 1/sqrt of this.")
@click.option("--removal", type=click.Choice(["auto", *REMOVALS]), default=DEFAULT_REMOVAL, show_default=True, help="How the pixel maps remove a cell: blur its pixels, fill them with the image's mean colour, inpaint them from the kept pixels around, or drop its tokens so the model never sees them (ViTs; every token dropped gives the head's prior). auto: drop for a ViT, blur otherwise (docs/benchmarks.md). Each map is exact for its removal.")
@click.option("--block", default=str(DEFAULT_BLOCK), show_default=True, callback=_block, help=f"The Shapley map's players are blocks of BLOCK x BLOCK cells (fewer runs, coarser map; a block's value is split evenly over its cells, the sum stays exact). auto: the fewest cells per block that make at most {MAX_PLAYERS} players (2 for DINOv2's 16x16 cells, 1 for EfficientNet's 7x7; coarser blocks delete worse, docs/benchmarks.md).")
@click.option("--occlusion", is_flag=True, help="Also the exact cell occlusion map: the logit drop when each cell alone is removed (N + 1 runs of the whole model).")
@click.option("--region-mask", type=click.Path(exists=True, dir_okay=False), help="Integer mask image (same size as the one IMAGE): exact contribution of each of your segments.")
@click.option("--json", "as_json", is_flag=True, help="Print the explanations as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars or stage notes.")
@user_errors
def explain(run_dir: str, images: tuple[str, ...], top_k: int, out_dir: str | None, device: str | None,
            node_removal: bool, pixel_map: str, permutations: int, removal: str, block: int | str, occlusion: bool, region_mask: str | None,
            as_json: bool, quiet: bool) -> None:
    """Explain IMAGES (files or folders) with the run in RUN_DIR: class, exact top-K training
    images for and against it (with their own region maps and matched region pairs), region
    heatmap PNG, an HTML page per image and the run's index.html."""
    from carrot.run import commands as orchestration

    results = orchestration.explain(run_dir, images, out_dir, top_k, device, node_removal=node_removal,
                                    region_mask=region_mask, pixel_map=None if pixel_map == "none" else pixel_map,
                                    permutations=permutations, occlusion=occlusion, removal=removal, block=block)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        sup = ", ".join(f"{Path(s['path']).name}({s['score']:+.3f})" for s in r["supporting"][:3])
        _echo(f"{r['image']}: {r['predicted']}  [support: {sup}]  page: {r['page']}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON file to write, with a .csv beside it (default: RUN_DIR/predictions.json).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True, help="Images per backbone batch.")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--quiet", is_flag=True, help="No progress bars or stage notes.")
@user_errors
def predict(run_dir: str, images: tuple[str, ...], out_path: str | None, batch_size: int, device: str | None, quiet: bool) -> None:
    """Classify IMAGES (files or folders) with the run in RUN_DIR, without explanations: one row per
    image (predicted class, score, runner-up, margin, every class score) in a CSV and a JSON file."""
    from carrot.run import commands as orchestration
    from carrot.text import for_terminal

    rows = orchestration.predict(run_dir, images, out_path, batch_size, device, progress=not quiet)
    for r in rows:
        click.echo("\t".join(for_terminal(v) for v in (r["image"], r["predicted"], f"{r['score']:.4f}")))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--what", default="accuracy,mislabel,faithfulness,lds,agreement", show_default=True,
              help="Comma-separated evaluations: accuracy (mean/std over seeds), mislabel, faithfulness, lds, agreement, deletion (region deletion/insertion AUC on the graph), pixel-deletion (the pixel protocol: each map's cells removed / kept in map order under every removal the backbone allows (blur, mean colour, inpaint, and token dropping for a ViT), the whole model re-run at each step; raw and scaled AUC, paired differences; maps: the Shapley map (the default), pixel split, occlusion, token and random), pointing (needs part locations), certificates (the fewest training images whose removal changes each of --n-test predictions; up to --certificate-limit).")
@click.option("--certificate-limit", type=click.IntRange(min=1), default=50, show_default=True, help="Certificates: the most training images removed per prediction.")
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="Accuracy: comma-separated seeds (each draws the --shots subsample and/or the --resplit split).")
@click.option("--shots", type=click.IntRange(min=1), help="Accuracy: train on this many images per class (few-shot), drawn per seed.")
@click.option("--resplit", is_flag=True, help="Accuracy: pool train+test and draw a new stratified split per seed (for data sets without an official split).")
@click.option("--flip-fraction", type=FRACTION, default=0.1, show_default=True, help="Share of training labels flipped for mislabel detection.")
@click.option("--k", "ks", default="1,5,10,20", show_default=True, help="Comma-separated K for faithfulness (remove/keep K images).")
@click.option("--n-test", type=click.IntRange(min=1), default=50, show_default=True, help="Test images evaluated (random subset; also for deletion).")
@click.option("--subsets", type=click.IntRange(min=2), default=50, show_default=True, help="Random 50% training subsets for LDS.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON file to write (default: RUN_DIR/evaluation.json).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON on stdout (default: one line per evaluation).")
@click.option("--quiet", is_flag=True, help="No progress bars or stage notes.")
@user_errors
def evaluate(run_dir: str, what: str, certificate_limit: int, seeds: str, shots: int | None, resplit: bool,
             flip_fraction: float, ks: str, n_test: int, subsets: int, out_path: str | None, as_json: bool,
             quiet: bool) -> None:
    """Evaluate the run in RUN_DIR: test accuracy mean/std over seeds (few-shot or re-split), and its exact
    attributions against exact LOO, TracIn and baselines: mislabel detection, faithfulness, linear
    datamodeling score, rank agreement; pointing game where part locations are known; counterfactual
    certificates (how few training images each prediction rests on)."""
    from carrot.progress import note
    from carrot.run import commands as orchestration

    k_list = _numbers("k", ks)
    seed_list = _numbers("seeds", seeds, minimum=0)
    res = orchestration.evaluate(run_dir, [w.strip() for w in what.split(",") if w.strip()], out_path,
                                 seeds=seed_list, shots=shots, resplit=resplit, certificate_limit=certificate_limit,
                                 flip_fraction=flip_fraction, ks=k_list, n_test=n_test, n_subsets=subsets,
                                 progress=note)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    from carrot.run.rundir import RunDir

    _echo_audit("evaluation", res)
    click.echo(f"-> {out_path or RunDir(run_dir).audit('evaluation')}")


@cli.command()
@click.argument("run_a", type=click.Path(exists=True, file_okay=False))
@click.argument("run_b", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON file to write (default: RUN_B/compare.json).")
@click.option("--quiet", is_flag=True, help="No progress bars or stage notes.")
@user_errors
def compare(run_a: str, run_b: str, out_path: str | None, quiet: bool) -> None:
    """Compare two runs on the same test images (a run and its reweighted child, two backbones, two t):
    accuracies, per-class change, McNemar's exact test and the images whose prediction changed."""
    from carrot.run import commands as orchestration

    res = orchestration.compare(run_a, run_b, out_path)
    _echo_audit("compare", res)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--val-fraction", type=FRACTION, default=0.2, show_default=True, help="Share of the training set held out as validation.")
@click.option("--steps", type=click.IntRange(min=1), help="Adam steps on the weights.")
@click.option("--lr", type=FiniteRange(min=0, min_open=True), help="Adam learning rate.")
@click.option("--loss", type=click.Choice(["mse", "ce"]), help="Validation loss.")
@click.option("--ess-floor", type=FiniteRange(0, 1), help="Minimum effective sample size per class, as a fraction of its size.")
@click.option("--entropy", type=FiniteRange(min=0), help="Weight of the per-class entropy bonus.")
@click.option("--consistency", type=FiniteRange(min=0), help="Weight of the attribution-consistency term (same-class validation images share supporters).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON file to write (default: RUN_DIR/reweight.json).")
@click.option("--apply", "apply_to", type=click.Path(file_okay=False), help="Also write a new run here whose head is fitted with the learned weights (explain, predict and evaluate --what pointing work on it).")
@click.option("--quiet", is_flag=True, help="No progress bars or stage notes.")
@user_errors
def reweight(run_dir: str, val_fraction: float, out_path: str | None, apply_to: str | None, quiet: bool,
             **rro: Any) -> None:
    """Reweight the training images of RUN_DIR by the exact validation-loss gradient (RRO) and report
    test accuracy against uniform weights, per-class effective sample sizes and the curves."""
    from carrot.run import commands as orchestration

    res = orchestration.reweight(run_dir, val_fraction, out_path, apply_to, **rro)
    _echo_audit("reweight", res)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--n-test", type=click.IntRange(min=1), default=20, show_default=True, help="Test images whose influence is written out.")
@click.option("--flag-fraction", type=FRACTION, default=0.02, show_default=True, help="Share of training images flagged for label review.")
@click.option("--epochs", type=click.IntRange(min=1), help="SGD epochs of the TracIn head.")
@click.option("--checkpoints", "n_checkpoints", type=click.IntRange(min=1), help="Checkpoints kept along the SGD run.")
@click.option("--quiet", is_flag=True, help="No progress bars or stage notes.")
@user_errors
def tracin(run_dir: str, n_test: int, flag_fraction: float, epochs: int | None, n_checkpoints: int | None, quiet: bool) -> None:
    """TracIn analysis of RUN_DIR (influence and self-influence over checkpoints, keyed by sample ids,
    quantiles, per-class summaries, label-review flags, comparison with exact LOO); shown in index.html."""
    from carrot.run import commands as orchestration

    _echo_audit("tracin", orchestration.tracin(run_dir, n_test, flag_fraction, epochs=epochs, n_checkpoints=n_checkpoints))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--drop", "ks", default="5,10,20,50", show_default=True, help="Comma-separated numbers of harmful images to drop.")
@click.option("--val-fraction", type=FRACTION, default=0.2, show_default=True, help="Share of the training set held out as validation.")
@click.option("--downweight", type=FiniteRange(0, 1, max_open=True), default=0.0, show_default=True, help="Weight given to the harmful images (0 drops them).")
@click.option("--apply", "apply_to", type=click.Path(file_okay=False), help="Also write a new run here with the drop of best validation accuracy applied.")
@click.option("--quiet", is_flag=True, help="No progress bars or stage notes.")
@user_errors
def debug(run_dir: str, ks: str, val_fraction: float, downweight: float, apply_to: str | None, quiet: bool) -> None:
    """Dataset debugging loop: find the training images most harmful to a validation split (exact LOO),
    drop or downweight them without refitting (Woodbury), report validation/test accuracy vs random drops."""
    from carrot.run import commands as orchestration

    res = orchestration.debug(run_dir, _numbers("drop", ks), val_fraction, downweight, apply_to)
    _echo_audit("debug", res)


@cli.command()
@run_options
@click.option("--out", "run_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--explain-n", type=click.IntRange(min=0), default=3, show_default=True, help="Test images to explain.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars or stage notes.")
@user_errors
def demo(run_dir: str, explain_n: int, overwrite: bool, quiet: bool, **opts: Any) -> None:
    """Offline demo: ELPV solar-cell images + built-in DINOv2 ViT-S/14; fit, compare with a
    logistic-regression probe on the same features, explain a few test images."""
    from carrot.run import commands as orchestration

    cfg = build_config(**opts)
    summary = orchestration.demo(cfg, run_dir, explain_n=explain_n, progress=not quiet, overwrite=overwrite)
    click.echo(json.dumps(summary, indent=2))
    if not quiet:  # after the JSON (stdout stays one JSON document), where a person reads on
        click.echo(f"carrot: explore it, with exact what-ifs: carrot-run studio {run_dir}", err=True)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback is reachable from other machines (warned).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=0, show_default=True, help="Port (0: a free one).")
@click.option("--token", envvar="CARROT_STUDIO_TOKEN", help="The access token (default: a new random one; env "
              "CARROT_STUDIO_TOKEN).")
@click.option("--work", "work_dir", type=click.Path(file_okay=False),
              help="Folder for the pages the studio writes (default: a temporary folder, removed on exit).")
@click.option("--quiet", is_flag=True, help="No stage notes.")
@user_errors
def studio(run_dir: str, host: str, port: int, token: str | None, work_dir: str | None, quiet: bool) -> None:
    """A local web app over a fitted run: summary, confusion, test and training images, explanations, label review,
    and exact what-ifs (remove, relabel, reweight training images: the new test predictions and label review
    without a refit); apply writes a new run beside this one. Prints its URL with the access token."""
    from carrot.studio.app import serve

    if token is not None and len(token) < 16:
        _fail(f"--token: expected at least 16 characters, got {len(token)}")
    serve(run_dir, host, port, token, work_dir)


def main() -> None:
    cli(prog_name="carrot-run")


if __name__ == "__main__":
    main()
