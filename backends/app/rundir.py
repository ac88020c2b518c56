"""Output directories written whole or not at all: a command builds ``<out>.partial`` and renames it into place.

    precheck(out)      before anything slow: refuse an existing file, a finished output (unless --overwrite or
                       --resume), or a ``.partial`` left by an interrupted command (unless --resume continues it)
    RunDir(out)        create ``<out>.partial`` (with --resume: continue it, or reopen the finished ``out``)
    commit()           swap ``<out>.partial`` into ``out``; a previous ``out`` is replaced only now, after the new one
                       is whole

An interrupted command therefore never leaves a half-written ``out``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import UsageError


class RunDir:
    """``work`` (= ``<final>.partial``) while a command runs; ``commit()`` swaps it into ``final``.

    An interrupted finetune leaves ``work`` behind, which ``--resume`` continues and anything else refuses to touch.
    """

    def __init__(self, final: str, *, resume: bool = False, resumable: bool = False, overwrite: bool = False):
        self.final, self.work = self.precheck(final, resume=resume, resumable=resumable, overwrite=overwrite)
        if not os.path.exists(self.work) and resume and os.path.isdir(self.final):
            os.replace(self.final, self.work)  # continue a finished run to more steps
        os.makedirs(self.work, exist_ok=True)

    @staticmethod
    def precheck(
        final: str, *, resume: bool = False, resumable: bool = False, overwrite: bool = False
    ) -> tuple[str, str]:
        """(final, work) paths; UsageError now, before any slow loading, if the output cannot be written."""
        final, work = RunDir.paths(final)
        if os.path.exists(final) and not os.path.isdir(final):
            raise UsageError(f"output path {final!r} exists and is not a directory")
        if os.path.exists(work) and not (resume and resumable):
            raise UsageError(
                f"{work!r} holds an interrupted run; pass --resume to continue it, or delete it"
                if resumable
                else f"{work!r} is left from an interrupted command; delete it first"
            )
        if os.path.isdir(final) and os.listdir(final) and not (overwrite or (resume and resumable)):
            also = ", --resume to continue it" if resumable else ""
            raise UsageError(
                f"{final!r} already holds a finished result; pass --overwrite to replace it{also}, "
                "or choose another output directory"
            )
        return final, work

    @staticmethod
    def paths(final: str) -> tuple[str, str]:
        """(final, work): the output directory and the ``<final>.partial`` it is built in."""
        final = str(Path(final))
        return final, final.rstrip("/") + ".partial"

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    def commit(self) -> str:
        old = self.final.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(self.final):
            os.replace(self.final, old)
        os.replace(self.work, self.final)
        shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abandon(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
