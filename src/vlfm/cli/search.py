"""The search commands: `vlfm index build|add` (embed images into a FAISS index) and `vlfm search`."""

from __future__ import annotations

import json
from pathlib import Path

from vlfm import distributed
from vlfm.cli.common import (
    add_collection_flags,
    add_max_pixels,
    add_precision,
    distributed_run,
    positive_int,
    text,
    two_tower,
)
from vlfm.io import UsageError, open_image
from vlfm.search.index import KINDS


def add_index(p) -> None:
    isub = p.add_subparsers(dest="index_command", required=True, metavar="build|add")
    b = isub.add_parser("build", help="embed images into a new index; re-running resumes where it stopped")
    b.add_argument("checkpoint", help="the model whose image embeddings are indexed")
    b.add_argument("--out", required=True, help="index directory (index.faiss + meta.sqlite)")
    b.add_argument("--kind", choices=KINDS, default="flat",
                   help="flat: exact inner product (default); hnsw: graph; ivf: inverted lists, exact distances, "
                        "for millions (--nlist 2048 at 1M); ivfpq: compressed")
    b.add_argument("--hnsw-m", type=positive_int, default=32, help="hnsw: neighbours per node")
    b.add_argument("--nlist", type=positive_int, default=1024, help="ivf, ivfpq: inverted lists (needs >= 39 x nlist images)")
    b.add_argument("--pq-m", type=positive_int, default=16, help="ivfpq: sub-quantizers (must divide the embedding size)")
    a = isub.add_parser("add", help="append images to an index without a rebuild (paths already in it are skipped)")
    a.add_argument("index")
    for q in (b, a):
        source = q.add_mutually_exclusive_group(required=True)
        source.add_argument("--images", help="an image folder, a caption file or WebDataset shards "
                                             "(undecodable images are skipped and counted)")  # fmt: skip
        source.add_argument("--captions", help="caption file (.csv/.tsv/.jsonl with filepath, caption): captions are stored")
        add_collection_flags(q)
        add_precision(q)


def add_search(p) -> None:
    p.add_argument("index")
    p.add_argument("text", nargs="?", type=text, help='the query, e.g. "a red circle"')
    p.add_argument("--image", help="an image as the query instead of a text")
    p.add_argument("-k", type=positive_int, default=10, help="number of hits")
    p.add_argument("--sheet", help="also write the hits as a contact-sheet PNG")
    p.add_argument("--checkpoint", help="embed the query with this model (default: the one that built the index)")
    add_max_pixels(p, "--image: an image")
    add_precision(p)


def index_command(args) -> None:
    from vlfm.checkpoint import load
    from vlfm.search import SearchIndex
    from vlfm.search.collection import Collection

    collection = Collection.from_source(args.images or args.captions)
    with distributed_run():
        if args.index_command == "build":
            model = two_tower(load(args.checkpoint, precision=args.precision), "index build")
            if distributed.rank() == 0:
                _open_or_create(args, model)
            distributed.barrier()  # the other ranks open what rank 0 created
            index = SearchIndex.open(args.out)
        else:
            index = SearchIndex.open(args.index)
            model = two_tower(load(index.info["model_path"], precision=args.precision), "index add")
        stats = index.add_collection(model, collection, args.batch_size, args.workers, args.chunk_size, args.max_pixels)
    if not stats:  # another rank than 0: rank 0 merged the chunks and reports
        return
    print(json.dumps(stats))
    if stats["skipped"] and not stats["added"] and not len(index):
        raise UsageError(f"none of the {stats['skipped']} images could be decoded (or all are over --max-pixels); "
                         "the index is empty")  # fmt: skip


def _open_or_create(args, model) -> None:
    from vlfm.search import SearchIndex

    if (Path(args.out) / "meta.sqlite").is_file():
        print(f"resuming {args.out} ({len(SearchIndex.open(args.out))} items already indexed)")
        return
    model_path = args.checkpoint
    SearchIndex.create(args.out, model, str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
                       args.kind, args.hnsw_m, args.nlist, args.pq_m)  # fmt: skip


def search_command(args) -> None:
    from vlfm.checkpoint import load
    from vlfm.search import SearchIndex
    from vlfm.search.index import contact_sheet

    if (args.text is None) == (args.image is None):
        raise UsageError("give a text query or --image, not both and not neither")
    index = SearchIndex.open(args.index)
    model = two_tower(load(args.checkpoint or index.info["model_path"], precision=args.precision), "search")
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
