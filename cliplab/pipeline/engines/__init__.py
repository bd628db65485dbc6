"""Execution engines for the embedding job. Both consume a :class:`~cliplab.pipeline.embed.JobContext` and commit
every pending shard through ``ctx.commit``; they differ only in where decoding and model compute run.

``local``  decode/preprocess in a thread pool (Pillow releases the GIL while decoding and resizing), model compute in
           the calling thread, overlapped through a bounded, ordered prefetch window.
``ray``    the same work as a Ray Data pipeline (``map_batches`` decode tasks -> one embedding actor), results
           regrouped into the same shards by item index on the driver. Needs ``pip install 'ray[data]'``.
"""

ENGINES = ("local", "ray")
