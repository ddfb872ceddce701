"""Which images a ``copy`` takes: named ones, ``--all``, ``--name N``, and ``--last K`` of each source."""

from __future__ import annotations

from imgbackup.errors import UsageError
from imgbackup.repository.repo import Repository


def select_images(repo: Repository, specs: list[str], every: bool = False, name: str | None = None,
                  last: int | None = None) -> list[dict]:
    """The chosen images' metadata, oldest first.

    ``specs`` are id prefixes or ``latest`` (of ``name`` when given); without specs, ``name`` picks
    every image of that source and ``every`` all images; ``last`` then keeps the ``last`` newest of
    each source name (alone it means: the newest ``last`` of every source)."""
    if last is not None and last < 1:
        raise UsageError("--last needs a count of at least 1")
    if not specs and not every and name is None and last is None:
        raise UsageError("name the images to copy", "give image ids or 'latest', or --all, --name N, --last K")
    readable = [e.meta for e in repo.images.entries() if e.meta is not None]
    if specs:
        wanted = {repo.images.resolve(spec, name) for spec in specs}
        chosen = [m for m in readable if m["id"] in wanted]
    elif name is not None and not every:
        chosen = [m for m in readable if m.get("name") == name]
    else:
        chosen = readable
    if last is not None:
        kept: list[dict] = []
        for source in {m.get("name") for m in chosen}:
            kept += [m for m in chosen if m.get("name") == source][-last:]
        chosen = kept
    return sorted(chosen, key=lambda m: m.get("created", 0.0))
