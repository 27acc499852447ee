"""Prompt packs: many jobs' PipelineConfigs from one .txt or .json file (domain only, no Prefect).

This package owns the two pack formats, their validation (every problem is a
:class:`~stablenew_core.errors.PackError` naming the file, the line or JSON path, and the cause)
and the deterministic expansion of a pack into :class:`PackEntry` objects. ``pack_id`` is the
file's stem.

.txt format
-----------
- Prompts are separated by blank lines. The lines of one prompt are stripped and joined with a
  single space. Lines starting with ``#`` are comments; they do not end a prompt.
- A ``neg:`` line adds to that prompt's negative prompt (several are joined with ``", "``).
- ``\\#`` or ``\\@`` at the start of a line writes a literal ``#`` or ``@`` in a prompt.
- ``<lora:name:weight>`` (also ``<lora:name>`` and ``<lora:name:te:unet>``) and
  ``<embedding:name>`` stay in the prompt verbatim; names must not be blank, weights must be
  plain decimal numbers.
- ``__name__`` is a wildcard: its values are the non-empty, non-``#`` lines of
  ``wildcards/name.txt`` beside the pack file.
- ``[[slot]]`` is a matrix slot (a letter, then letters, digits, ``_`` or ``-``); it must be
  declared. For A1111's double de-emphasis of one word write ``[ [word] ]``.
- Directives are lines starting with ``@``; they apply to the whole pack wherever they stand,
  do not end a prompt, and each (but ``@matrix``/``@preset``) may appear once::

      @name Portraits                      (default: the file's stem)
      @matrix style: oil painting | watercolor | photo
      @matrix light: dawn | noon           (one line per slot; values split on '|')
      @matrix_mode fanout                  (fanout | random)
      @matrix_limit 4                      (combinations per prompt; required for random)
      @images_per_prompt 2
      @seed_mode increment                 (fixed | increment | random)
      @seed 1234                           (-1: derived from the pack's content)
      @preset steps: 30                    (one PipelineConfig field; value read as JSON if it
      @preset hires.enabled: true           parses, else as text; dotted keys for sections)

  A colon after the directive name is optional (``@seed: 42``).

.json format
------------
See :class:`JsonPack` and the published ``stablenew_core/schemas/pack.schema.json``:
``name``, ``prompts`` (strings, or ``{prompt, negative, loras: [{name, weight}],
embeddings: [name]}`` whose LoRAs and embeddings are appended to the prompt with ``", "`` as
``<lora:name:weight>`` and plain names), ``matrix`` (``{slots, mode, limit}``), ``preset``,
``images_per_prompt``, ``seed_mode``, ``seed``. Wildcards and ``[[slot]]`` work as in .txt.

Expansion
---------
- Order: for each prompt, for each of its matrix combinations, ``images_per_prompt`` jobs.
- A prompt's combinations range over the slots it uses (text or negative), in declaration
  order, the first slot varying slowest (fanout). ``limit`` keeps the first ``limit`` of them
  (fanout) or draws ``limit`` distinct ones with a seeded RNG, kept in fanout order (random).
- Wildcards: each occurrence draws one value with an RNG seeded from the start seed and the
  prompt index; the picks are shared by all combinations and images of that prompt (so a
  matrix compares like with like). Values put in for slots or wildcards are not scanned again.
- Start seed: ``seed=`` argument, else the caller's ``base`` seed unless -1, else the pack's
  seed. -1 derives a seed from the pack's content (:meth:`PromptPack.fingerprint`), so a
  pack expands the same way every time; pass a seed to get other images.
- Seeds: ``fixed`` every job the start seed; ``increment`` start + the job's index (wrapping at
  2**32); ``random`` drawn from an RNG seeded by the start seed.
- Config precedence: PipelineConfig defaults < the pack's ``preset`` < the caller's ``base``
  (a dict of only the options the caller set; a PipelineConfig counts as all set). Nested
  sections merge key by key. The prompt always comes from the pack entry; the pack's negative is
  appended to the preset/base ``negative_prompt`` with ``", "``.
- Caps: DEFAULT_MAX_JOBS (512); ``max_jobs=`` may raise it to HARD_MAX_JOBS (8192). Over the
  cap is a PackError; every entry's config is validated before any is returned.
"""

from __future__ import annotations

from ._expand import expand_pack, load_and_expand
from ._load import load_pack
from ._models import (
    DEFAULT_MAX_JOBS,
    HARD_MAX_JOBS,
    JsonLora,
    JsonPack,
    JsonPrompt,
    MatrixMode,
    PackEntry,
    PackMatrix,
    PackPrompt,
    PromptPack,
    SeedMode,
    pack_json_schema,
)

__all__ = [
    "DEFAULT_MAX_JOBS",
    "HARD_MAX_JOBS",
    "JsonLora",
    "JsonPack",
    "JsonPrompt",
    "MatrixMode",
    "PackEntry",
    "PackMatrix",
    "PackPrompt",
    "PromptPack",
    "SeedMode",
    "expand_pack",
    "load_and_expand",
    "load_pack",
    "pack_json_schema",
]
