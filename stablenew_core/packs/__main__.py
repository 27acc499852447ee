"""``python -m stablenew_core.packs``: rewrite schemas/pack.schema.json from the pack model."""

from __future__ import annotations

from ._models import SCHEMA_PATH, render_pack_schema


def main() -> None:
    """Write the published JSON Schema of the .json pack format."""
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(render_pack_schema(), encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")


if __name__ == "__main__":
    main()
