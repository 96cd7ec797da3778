"""The search commands: `vlfm index build|add` (embed images into a FAISS index) and `vlfm search`."""

from __future__ import annotations

import json
from pathlib import Path

from vlfm.cli.common import add_max_pixels, positive_int, text, two_tower
from vlfm.io import UsageError, open_image


def add_index(p) -> None:
    isub = p.add_subparsers(dest="index_command", required=True, metavar="build|add")
    b = isub.add_parser("build", help="embed images into a new index; re-running resumes where it stopped")
    b.add_argument("checkpoint", help="the model whose image embeddings are indexed")
    b.add_argument("--out", required=True, help="index directory (index.faiss + meta.sqlite)")
    b.add_argument("--kind", choices=("flat", "hnsw", "ivfpq"), default="flat",
                   help="flat: exact inner product (default); hnsw: graph; ivfpq: compressed, for millions")
    b.add_argument("--hnsw-m", type=positive_int, default=32, help="hnsw: neighbours per node")
    b.add_argument("--nlist", type=positive_int, default=1024, help="ivfpq: inverted lists (needs >= 39 x nlist images)")
    b.add_argument("--pq-m", type=positive_int, default=16, help="ivfpq: sub-quantizers (must divide the embedding size)")
    a = isub.add_parser("add", help="append images to an index without a rebuild (paths already in it are skipped)")
    a.add_argument("index")
    for q in (b, a):
        source = q.add_mutually_exclusive_group(required=True)
        source.add_argument("--images", help="folder of images (undecodable ones are skipped and counted)")
        source.add_argument("--captions", help="caption file (.csv/.tsv/.jsonl with filepath, caption): captions are stored")
        q.add_argument("--batch-size", type=positive_int, default=256)
        add_max_pixels(q, "images (skipped and counted)")


def add_search(p) -> None:
    p.add_argument("index")
    p.add_argument("text", nargs="?", type=text, help='the query, e.g. "a red circle"')
    p.add_argument("--image", help="an image as the query instead of a text")
    p.add_argument("-k", type=positive_int, default=10, help="number of hits")
    p.add_argument("--sheet", help="also write the hits as a contact-sheet PNG")
    p.add_argument("--checkpoint", help="embed the query with this model (default: the one that built the index)")
    add_max_pixels(p, "--image: an image")


def _index_items(args) -> list[tuple[Path, str]]:
    from vlfm.data.sources import list_images, read_caption_file

    try:
        if args.images:
            return [(path, "") for path in list_images(args.images)]
        return read_caption_file(args.captions)
    except ValueError as error:
        raise UsageError(str(error)) from None


def index_command(args) -> None:
    from vlfm.checkpoint import load
    from vlfm.search import SearchIndex

    items = _index_items(args)
    if args.index_command == "build":
        model_path = args.checkpoint
        model = two_tower(load(model_path), "index build")
        if (Path(args.out) / "meta.sqlite").is_file():
            index = SearchIndex.open(args.out)
            print(f"resuming {args.out} ({len(index)} items already indexed)")
        else:
            index = SearchIndex.create(args.out, model, str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
                                       args.kind, args.hnsw_m, args.nlist, args.pq_m)  # fmt: skip
    else:
        index = SearchIndex.open(args.index)
        model = two_tower(load(index.info["model_path"]), "index add")
    stats = index.add_images(model, items, args.batch_size, max_pixels=args.max_pixels)
    print(json.dumps(stats))
    if stats["skipped"] and not stats["added"] and not len(index):
        raise UsageError(f"none of the {stats['skipped']} images could be decoded (or all are over --max-pixels); "
                         "the index is empty")  # fmt: skip


def search_command(args) -> None:
    from vlfm.checkpoint import load
    from vlfm.search import SearchIndex
    from vlfm.search.index import contact_sheet

    if (args.text is None) == (args.image is None):
        raise UsageError("give a text query or --image, not both and not neither")
    index = SearchIndex.open(args.index)
    model = two_tower(load(args.checkpoint or index.info["model_path"]), "search")
    index.check_model(model)
    if args.image:
        query = model.embed_images([open_image(args.image, args.max_pixels, model.preprocess_config.image_size)])
    else:
        query = model.embed_texts([args.text])
    hits = index.search(query.cpu().numpy(), args.k)[0]
    print(f"{'rank':>4}  {'score':>6}  path  caption")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>4}  {hit.score:6.3f}  {hit.path}  {hit.caption}")
    if args.sheet:
        print(f"wrote {contact_sheet(hits, args.sheet)}")
