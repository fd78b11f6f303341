"""Check a stream's data root before anything trains; optionally convert it to sharded Parquet for Ray Data.

Usage:
    python jobs/prepare_data.py --stream mllm-cl-domain --root /data/MLLM-CL/Domain_data
    python jobs/prepare_data.py --stream coin --root /data/CoIN --option instructions_dir=. --option images_dir=datasets
    python jobs/prepare_data.py --stream ucit --root /data/UCIT --parquet /data/UCIT-parquet --shard-rows 2000
    python jobs/prepare_data.py --stream msvqa --root /data/MSVQA --skip-bad --parquet /data/MSVQA-parquet
    python jobs/prepare_data.py --stream mllm-cl-domain --root /data/MLLM-CL/Domain_data --manifest domain.manifest.json

Reads every task and split of the stream (options as ``stream.options``, one ``--option key=value`` each,
values in YAML, dotted keys such as ``layout.RS.train=RemoteSensing/train.json``) and collects every problem
instead of stopping at the first: malformed rows, duplicate ids, image paths that are absolute or escape the
root, missing or undecodable images, unknown answer types. Prints the report (Markdown: samples, answer types
and problems per task and split, the first few examples of each problem) and writes it as JSON (--report).

Exit status: 0 when the data has no problem, or with --skip-bad when every problem is confined to samples
(they are left out, as a run with ``stream.skip_bad_samples=true`` would); 1 when it has problems (or a file
or folder cannot be read at all, which --skip-bad cannot skip); 2 for a bad invocation (unknown stream or
option).

--parquet OUT_DIR writes the good samples as Parquet shards with the image bytes embedded (export schema of
``mcl.streams.sources``; one file per task, split and --shard-rows samples), then prints how to run from them:
``stream.root=OUT_DIR 'stream.options={source: parquet}'``. It writes the data as stored: options that select
a view of it (sample limits, MSVQA's protocol) belong to the run that reads the export, not here.

--manifest PATH writes a data manifest of the root (every annotation file's sha256, every image's size and
sha256; see ``mcl.streams.manifest``) once the data passed the check; a run given ``stream.manifest=PATH``
checks its data against it before training and names every changed, missing or added file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# Run the engine next to this file, not an installed copy (as jobs/run_stream.py does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

# Options that describe a view of the data rather than the data; an export must not bake them in.
VIEW_OPTIONS = ("max_train_per_task", "max_test_per_task", "protocol", "chunks_per_scenario")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def options_from_pairs(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (YAML values, dotted keys nest) as a stream options mapping."""
    from mcl.config import parse_override, set_dotted

    options: dict[str, Any] = {}
    for pair in pairs:
        path, value = parse_override(pair)
        set_dotted(options, path, value)
    return options


def _write_manifest(stream: str, root: str, path: str, workers: int) -> None:
    from mcl.streams.manifest import build_manifest, write_manifest

    manifest = build_manifest(root, stream, workers, skip=Path(path))
    out = write_manifest(manifest, path).resolve()
    _progress(
        f"manifest of {len(manifest['annotations'])} annotation files and {len(manifest['images'])} images "
        f"written to {out}; check a run's data against it with stream.manifest={out}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--stream", required=True, help="a registered stream, e.g. mllm-cl-domain, coin, msvqa"
    )
    parser.add_argument("--root", required=True, help="the stream's data root (what stream.root points at)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a stream option (stream.options.KEY), repeatable; e.g. --option tasks=[RS,Med]",
    )
    parser.add_argument(
        "--report",
        default="data_report.json",
        help="where to write the report as JSON (default: %(default)s in the current directory)",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out bad samples (exit 0 if only samples are bad) and convert the rest",
    )
    parser.add_argument(
        "--no-images", action="store_true", help="do not open the images (faster, less checked)"
    )
    parser.add_argument(
        "--workers", type=int, default=8, help="threads decoding images (default: %(default)s)"
    )
    parser.add_argument(
        "--manifest",
        metavar="PATH",
        help="write a data manifest here (sha256 of every annotation file, size and sha256 of every image); "
        "a run with stream.manifest=PATH checks its data against it before training",
    )
    parser.add_argument("--parquet", metavar="OUT_DIR", help="write the good samples as Parquet shards here")
    parser.add_argument(
        "--shard-rows", type=int, default=1000, help="samples per Parquet file (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    import mcl
    from mcl.errors import ConfigError, MclError
    from mcl.streams.check import format_report, inspect_stream

    _progress(f"mcl engine: {Path(mcl.__file__).parent}")
    try:
        options = options_from_pairs(args.option)
        if args.shard_rows < 1:
            raise ConfigError(f"--shard-rows: must be >= 1, got {args.shard_rows}")
        if args.workers < 1:
            raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
        if args.parquet and args.no_images:
            raise ConfigError("--parquet embeds every image, so it checks them: drop --no-images")
        view = [name for name in VIEW_OPTIONS if name in options]
        if args.parquet and view:
            raise ConfigError(
                f"--parquet writes the data as stored; drop --option {', '.join(view)} here and set "
                "stream.options.<name> in the run that reads the export"
            )
        start = time.perf_counter()
        stream, report = inspect_stream(
            args.stream, args.root, options, images=not args.no_images, workers=args.workers, log=_progress
        )
    except MclError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print(format_report(report))
    report_path = Path(args.report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(
        json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    _progress(f"report written to {report_path.resolve()} ({time.perf_counter() - start:.1f}s)")

    if report.fatal:
        print(f"error: the data cannot be used: {report.fatal}", file=sys.stderr)
        return 1
    if not report.ok and not args.skip_bad:
        print(
            f"error: {report.skipped} bad samples (see the report); fix them, or leave them out with --skip-bad "
            "(in a run: stream.skip_bad_samples=true)",
            file=sys.stderr,
        )
        return 1
    if report.skipped:
        _progress(f"--skip-bad: left out {report.skipped} bad samples; {report.samples} remain")
    if args.manifest:
        _write_manifest(args.stream, args.root, args.manifest, args.workers)
    if args.parquet:
        from mcl.streams.sources import write_parquet_shards

        try:
            files = write_parquet_shards(stream.tasks, args.parquet, args.shard_rows, log=_progress)
        except MclError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        out = Path(args.parquet).resolve()
        _progress(f"{len(files)} Parquet files in {out}; run from them with:")
        _progress(
            f"  python jobs/run_stream.py stream.name={args.stream} stream.root={out} "
            "'stream.options={source: parquet}'"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
