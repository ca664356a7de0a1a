"""`sdo data ...`: synthetic COCO and COCO -> WebDataset shards (pipelines/)."""
import json

import click


@click.group()
def data() -> None:
    """Datasets: synthetic COCO, WebDataset shards."""


@data.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Dataset root to create.")
@click.option("--train", "num_train", default=96, show_default=True, type=click.IntRange(min=0),
              help="Training images.")
@click.option("--val", "num_val", default=16, show_default=True, type=click.IntRange(min=0),
              help="Validation images.")
@click.option("--size", default=256, show_default=True, type=click.IntRange(min=32),
              help="Longer image side in pixels (some images are 3:4 or 4:3).")
@click.option("--seed", default=0, show_default=True, type=int, help="Dataset seed (same seed, same bytes).")
@click.option("--max-shapes", default=4, show_default=True, type=click.IntRange(min=1),
              help="At most this many shapes per image (at least one).")
@click.option("--scale", nargs=2, type=float, default=(0.15, 0.45), show_default=True,
              help="Shape width as a fraction LOW HIGH of the shorter image side.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
def synth(out_dir, num_train, num_val, size, seed, max_shapes, scale, overwrite) -> None:
    """Write a synthetic COCO dataset of shapes: OUT/{train,val}/*.jpg + OUT/annotations/*.json."""
    from pipelines.synth import generate

    summary = generate(out_dir, num_train, num_val, size=size, seed=seed, overwrite=overwrite,
                       max_shapes=max_shapes, scale=tuple(scale))
    for split, info in summary["splits"].items():
        click.echo(f"{split}: {info['images']} images, {info['annotations']} boxes -> {info['image_dir']}, "
                   f"{info['annotation_file']}")
    click.echo(f"categories: {', '.join(summary['categories'])}")


@data.command()
@click.option("--images", "images_dir", required=True, type=click.Path(), help="Folder of the COCO images.")
@click.option("--annotations", "annotations_file", required=True, type=click.Path(),
              help="COCO instances json of those images.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Shard directory to write (shard-*.tar + index.json).")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Samples per shard (default 1000 when --max-bytes is not given).")
@click.option("--max-bytes", type=click.IntRange(min=1), default=None, help="Largest shard file size in bytes.")
@click.option("--max-skip-fraction", type=click.FloatRange(0.0, 1.0), default=0.05, show_default=True,
              help="Largest share of image records or annotations that may be skipped; over it the shards stay "
                   "in OUT/unpublished-*/ and no index.json is published (exit 2).")
@click.option("--overwrite", is_flag=True,
              help="Replace the shards of an earlier `sdo data shard` in OUT (only files its index.json lists).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report (index.json) as JSON.")
def shard(images_dir, annotations_file, out_dir, shard_size, max_bytes, max_skip_fraction, overwrite, no_progress,
          as_json) -> None:
    """Convert a COCO folder into WebDataset shards; bad items are counted and reported, never kept."""
    from pipelines.shard import write_shards

    report = write_shards(images_dir, annotations_file, out_dir, shard_size=shard_size, max_bytes=max_bytes,
                          overwrite=overwrite, progress=not no_progress, max_skip_fraction=max_skip_fraction)
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    total_bytes = sum(s["bytes"] for s in report["shards"])
    click.echo(f"{report['num_samples']} images, {report['num_annotations']} boxes -> {len(report['shards'])} "
               f"shards ({total_bytes / 2**20:.1f} MiB) in {report['out_dir']}")
    click.echo(f"source sha256 {report['source']['sha256'][:16]}; categories {len(report['categories'])} "
               f"(largest id {report['max_category_id']}); {report['num_crowd']} crowd regions; "
               f"skipped {report['skip_fraction']:.1%} (limit {report['max_skip_fraction']:.1%})")
    for title, counts in (("skipped", report["skipped"]), ("fixed", report["fixed"])):
        for reason, count in counts.items():
            examples = "; ".join(report["examples"].get(reason, [])[:2])
            click.echo(f"{title} {reason}: {count}" + (f" (e.g. {examples})" if examples else ""))


@data.command()
@click.argument("shard_dir", type=click.Path(file_okay=False))
@click.argument("destination")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, Ceph, ...) "
                                                   "[default: $AWS_ENDPOINT_URL, else AWS].")
def upload(shard_dir, destination, endpoint_url) -> None:
    """Upload a shard directory (shard-*.tar + index.json) to DESTINATION = s3://BUCKET/PREFIX, index last.

    Readers never see a half-uploaded set: the old index is removed first and the new one written
    after every shard is stored and its size checked. Prints the data.*_shards value that reads it.
    """
    from pipelines.remote import pipe_source, upload_shards

    report = upload_shards(shard_dir, destination, endpoint_url=endpoint_url,
                           progress=lambda name, size: click.echo(f"uploaded {name} ({size / 2**20:.1f} MiB)", err=True))
    click.echo(f"{report['shards']} shards ({report['bytes'] / 2**20:.1f} MiB) + {report['index_url'].rsplit('/', 1)[1]} "
               f"-> {report['destination']} at {report['endpoint_url']}")
    click.echo(f"read it with: data.train_shards / data.val_shards = {pipe_source(report['index_url'], endpoint_url=endpoint_url)}")


@data.command()
@click.argument("url")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint [default: $AWS_ENDPOINT_URL, else AWS].")
def cat(url, endpoint_url) -> None:
    """Write the object URL (s3://BUCKET/KEY) to stdout, with bounded timeouts and retries.

    What the loader runs through `pipe:` to read uploaded shards (see `sdo data upload`).
    """
    from pipelines.remote import cat as cat_object

    cat_object(url, endpoint_url=endpoint_url)
