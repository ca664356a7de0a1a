"""`sdo data ...`: synthetic COCO and COCO -> WebDataset shards (pipelines/)."""
import click


@click.group()
def data() -> None:
    """Datasets: synthetic COCO, WebDataset shards."""
