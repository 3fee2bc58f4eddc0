#!/usr/bin/env python
"""Evaluate a trained run: accuracy, ECE and OOD detection; writes metrics.json, results.md, roc.png, hist.png.

    python eval.py --run runs/demo
    python eval.py --checkpoint runs/demo/best.pt --ood heldout,gaussian,uniform --scores msp,energy
    python eval.py --run runs/c10 --ood-group near=imagefolder:../shared/datasets/tinyimagenet/test \
        --ood-group far=mnist,imagefolder:../shared/datasets/dtd-subset \
        --val-ood imagefolder:../shared/datasets/tinyimagenet/val --search --scores all

A model trained elsewhere (a timm name or torchvision:<name>, its weights file, the ID data; the data
are brought to the model's own normalisation and input size):

    python eval.py --model torchvision:resnet18 --weights resnet18_c10.pth --data cifar10 --out runs/tv_r18
    python eval.py --model vit_tiny_patch16_224 --model-kwargs '{"img_size": 32, "patch_size": 4}' \
        --weights vit_c10.safetensors --data cifar10 --scores all --out runs/vit

Under ``torchrun`` (``torchrun --standalone --nproc_per_node=2 eval.py --run runs/demo``) the ranks share
the evaluation's per-loader passes out and gather them (the same numbers as one process); rank 0 alone
writes the outputs.

The loss x score benchmark has its own script: ``python bench.py -c configs/bench_digits.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lossbench.framework.cli import list_type, run_main
from lossbench.framework.config import json_object


def _group(text: str):
    """``NAME=SET,SET`` -> ``(NAME, [SET, SET])``."""
    name, sep, sets = text.partition("=")
    names = [v for v in sets.split(",") if v]
    if not sep or not name or not names:
        raise argparse.ArgumentTypeError(f"expected NAME=SET[,SET...], got {text!r}")
    return name, names


def build_parser() -> argparse.ArgumentParser:
    from lossbench.experiments.evaluate_run import DEFAULT_SCORES
    from lossbench.framework.plugins import add_plugin_option
    from ood import CONVENTIONS, list_scores

    p = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", help="run folder; its best.pt is evaluated")
    src.add_argument("--checkpoint", help="checkpoint file")
    src.add_argument("--model", help="a model trained elsewhere: a timm name (a pretrained tag such as "
                                     "resnet18.a1_in1k picks that tag's normalisation) or torchvision:<name>")
    anym = p.add_argument_group("a model trained elsewhere (--model / --weights; needs --data and --out)")
    anym.add_argument("--weights", default=None,
                      help="its weights: a state_dict file (torch.save of model.state_dict(), also under "
                           "'state_dict' or 'model'; .safetensors) or a lossbench checkpoint")
    anym.add_argument("--random-init", action="store_true",
                      help="evaluate the architecture with random weights on purpose (refused otherwise: the "
                           "numbers would describe no trained model)")
    anym.add_argument("--model-kwargs", type=json_object("--model-kwargs"), default=None,
                      help='JSON keyword arguments of the model constructor, e.g. \'{"img_size": 32, "patch_size": 4}\'')
    anym.add_argument("--data", default=None, help="the in-distribution data: digits | mnist | fashionmnist | "
                                                   "cifar10 | cifar100 | svhn | imagefolder:<path>")
    anym.add_argument("--test-folder", default=None, help="imagefolder data: the test split from this folder")
    anym.add_argument("--id-classes", type=list_type(int, "--id-classes"), default=None,
                      help="in-distribution classes of --data; the others become the 'heldout' OOD set")
    anym.add_argument("--max-train-samples", type=int, default=None,
                      help="fit the scores on a class-stratified subset of the training split")
    anym.add_argument("--seed", type=int, default=0, help="seed of the data splits and OOD subsets")
    anym.add_argument("--mean", type=list_type(float, "--mean"), default=None,
                      help="input normalisation mean per channel (with --std), instead of the model's own")
    anym.add_argument("--std", type=list_type(float, "--std"), default=None, help="input normalisation std per channel")
    anym.add_argument("--img-size", type=int, default=None, help="input size, instead of the model's own")
    anym.add_argument("--tv-weights", default=None,
                      help="torchvision models: the weights enum whose transforms give the normalisation and "
                           "size (e.g. IMAGENET1K_V1; default: the architecture's DEFAULT); nothing is downloaded")
    sets = p.add_mutually_exclusive_group()
    sets.add_argument("--ood", type=list_type(str, "--ood"), default=None,
                      help="OOD sets: heldout, gaussian, uniform, a data set name or imagefolder:<path> "
                           "(default: heldout if the data has held-out classes, gaussian, uniform)")
    sets.add_argument("--ood-group", type=_group, action="append", default=None, metavar="NAME=SET,SET",
                      help="a named group of OOD sets (repeat: --ood-group near=... --ood-group far=...); "
                           "tables add each group's mean")
    p.add_argument("--val-ood", default=None,
                   help="the validation OOD set (never a test set) for --search")
    p.add_argument("--search", action="store_true",
                   help="choose each score's hyper-parameters from its grid by AUROC of the ID validation split "
                        "vs --val-ood (OpenOOD's protocol; the test sets are not used)")
    p.add_argument("--feature-cache", default=None,
                   help="folder of the cached feature passes (default: <output folder>/features)")
    p.add_argument("--no-feature-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--scores", type=list_type(str, "--scores"), default=None,
                   help=f"OOD scores, or 'all' (default: {','.join(DEFAULT_SCORES)}; all: {','.join(list_scores())})")
    p.add_argument("--score-args", type=json.loads, default=None,
                   help='JSON {score: {arg: value}}, e.g. \'{"energy": {"temperature": 1}}\'')
    p.add_argument("--convention", default="paper", choices=list(CONVENTIONS))
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-ood-samples", type=int, default=2000)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder; required with --model "
                                               "/ --weights)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_plugin_option(p)
    return p


#: Options of the any-model mode (``--model`` / ``--weights``) that a run's evaluation does not take.
ANY_MODEL_ONLY = ("weights", "random_init", "model_kwargs", "data", "test_folder", "id_classes", "max_train_samples",
                  "mean", "std", "img_size", "tv_weights")


def _ood_sets(args):
    from lossbench.errors import UserInputError

    if not args.ood_group:
        return args.ood
    groups = {}
    for name, names in args.ood_group:
        if name in groups:
            raise UserInputError(f"--ood-group {name!r} is given twice; name each group once")
        groups[name] = names
    return groups


def _init_distributed(args) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group, one GPU per rank (``cuda:<LOCAL_RANK>``);
    the ranks share the evaluation's passes out (:mod:`ood.distributed`). True on the rank that writes the outputs
    (rank 0, or the only process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from lossbench.framework.distributed import init_distributed
    from lossbench.framework.runtime import select_device

    device = select_device(args.device)
    info = init_distributed(device)
    if device.type == "cuda":
        args.device = f"cuda:{info.local_rank}"
    return info.is_main


def _main_any_model(args, writer: bool = True) -> int:
    """``--model`` / ``--weights``: a model trained elsewhere, through the same ``evaluate_model``."""
    from lossbench.errors import UserInputError
    from lossbench.experiments import write_report
    from lossbench.experiments.any_model import evaluate_any_model
    from lossbench.experiments.evaluate_run import REPORT_FILES, check_score_kwargs, resolve_scores

    if args.out is None:
        raise UserInputError("--out is required with --model / --weights: there is no run folder to write into")
    if args.data is None:
        raise UserInputError("--data is required with --model / --weights: the in-distribution set to evaluate on")
    if args.search and args.val_ood is None:
        raise UserInputError("--search needs --val-ood, the validation OOD set the search is run on")
    ood_sets = _ood_sets(args)
    check_score_kwargs(resolve_scores(args.scores), args.score_args, "--score-args")
    cache = None if args.no_feature_cache else (args.feature_cache or os.path.join(args.out, "features"))
    result = evaluate_any_model(
        args.model, args.weights, args.data, random_init=args.random_init, model_kwargs=args.model_kwargs,
        mean=args.mean, std=args.std, img_size=args.img_size, tv_weights=args.tv_weights, data_root=args.data_root,
        test_folder=args.test_folder, id_classes=args.id_classes, max_train_samples=args.max_train_samples,
        seed=args.seed, device=args.device, ood_sets=ood_sets, scores=args.scores, score_kwargs=args.score_args,
        convention=args.convention, batch_size=args.batch_size, max_ood_samples=args.max_ood_samples,
        progress=not args.no_progress, val_ood=args.val_ood, search=args.search, feature_cache_dir=cache)
    if not writer:
        return 0
    os.makedirs(args.out, exist_ok=True)
    print(write_report(result, args.out))
    m = result["model"]
    print(f"model {m['name']} ({m['weights_kind']}): {m['input']['size']} px input (from {m['input']['from']['size']}), "
          f"normalised by {m['input']['from']['normalisation']}; features: {m['features']}")
    print(f"wrote {', '.join(REPORT_FILES)} to {args.out}"
          + (f"; feature cache in {cache}" if cache else ""))
    return 0


def main(argv=None) -> int:
    from lossbench.errors import UserInputError
    from lossbench.experiments import evaluate_checkpoint, write_report
    from lossbench.experiments.evaluate_run import REPORT_FILES, check_score_kwargs, resolve_scores
    from ood.registry import get_score_class

    from lossbench.framework.plugins import preload_plugins

    preload_plugins(argv)  # before the parser lists the scores and anything checks a name
    args = build_parser().parse_args(argv)
    any_model = args.model is not None or args.weights is not None
    if sum([args.run is not None, args.checkpoint is not None, any_model]) != 1:
        raise UserInputError("give one of --run RUN, --checkpoint FILE, or --model NAME / --weights FILE "
                             "(a model trained elsewhere)")
    if not any_model:
        given = [f"--{k.replace('_', '-')}" for k in ANY_MODEL_ONLY if getattr(args, k) not in (None, False)]
        if given:
            raise UserInputError(f"{', '.join(given)} apply to a model trained elsewhere (--model / --weights); "
                                 f"a run's own configuration gives its data and input")
    for name in resolve_scores(args.scores):  # every name (plug-ins included) before anything is loaded
        get_score_class(name)
    writer = _init_distributed(args)
    if any_model:
        return _main_any_model(args, writer)
    ckpt = args.checkpoint or os.path.join(args.run, "best.pt")
    if args.run:
        from lossbench.framework.checkpoint import stale_best

        stale = stale_best(args.run)
        if stale:
            raise UserInputError(f"--run {args.run!r}: {stale}; resume the run (train.py with its options and "
                                 f"--resume) to bring best.pt up to date, or pass --checkpoint to evaluate it as it is")
    out = args.out or os.path.dirname(os.path.abspath(ckpt))
    ood_sets = _ood_sets(args)
    if args.search and args.val_ood is None:
        raise UserInputError("--search needs --val-ood, the validation OOD set the search is run on")
    check_score_kwargs(resolve_scores(args.scores), args.score_args, "--score-args")  # before loading anything
    cache = None if args.no_feature_cache else (args.feature_cache or os.path.join(out, "features"))
    result = evaluate_checkpoint(ckpt, ood_sets=ood_sets, scores=args.scores, score_kwargs=args.score_args,
                                 convention=args.convention, data_root=args.data_root,
                                 batch_size=args.batch_size, device=args.device,
                                 max_ood_samples=args.max_ood_samples, progress=not args.no_progress,
                                 val_ood=args.val_ood, search=args.search, feature_cache_dir=cache)
    if not writer:  # under torchrun, rank 0 alone writes the report
        return 0
    print(write_report(result, out))
    print(f"wrote {', '.join(REPORT_FILES)} to {out}"
          + (f"; feature cache in {cache}" if cache else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main("eval.py", main))
