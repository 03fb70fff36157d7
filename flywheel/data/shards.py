"""The two datatrove steps of a token-store build: read a task's piece, tokenize it into one shard.

Module-level classes (not closures) so datatrove's process pool can pickle them; imported
only when a store is built, because datatrove costs half a second to import.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.tokens.tokenizer import TokenizedFile
from datatrove.utils.batching import batched
from datatrove.utils.tokenization import PipelineStepWithTokenizer

from flywheel.config import DataSource
from flywheel.data.kinds import ROWS_PER_BATCH, Piece, piece_texts
from flywheel.failpoints import failpoint


class QuietExecutor(LocalPipelineExecutor):
    """datatrove's local executor, with each task's console log (loguru on stderr) sent to `log_file`.

    The CLI draws its own progress bar; datatrove's per-task logs stay in `logging_dir` as usual.
    """

    log_file: str | None = None

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):  # noqa: ANN202
        from datatrove.utils.logging import logger

        with open(self.log_file or os.devnull, "a") as log, contextlib.redirect_stderr(log):
            try:
                return super()._run_for_rank(rank, local_rank, node_rank)
            finally:
                logger.remove()  # its default sink holds the redirected stream, about to close
                logger.add(log.name if self.log_file else os.devnull, level="WARNING")

    def run(self):  # noqa: ANN201
        from datatrove.utils.logging import logger

        logger.remove()  # the parent's own messages ("Skipping 3 completed tasks") go to the same file
        logger.add(self.log_file or os.devnull, level="INFO")
        return super().run()


class ReadPiece(PipelineStep):
    """Task `rank` reads piece `rank` of the source."""

    name = "flywheel piece reader"
    type = "📖 - READER"

    def __init__(self, src: DataSource, pieces: list[Piece]):
        super().__init__()
        self.src, self.pieces = src, pieces

    def run(self, data, rank: int = 0, world_size: int = 1):
        for i, text in enumerate(piece_texts(self.src, self.pieces[rank])):
            yield Document(text=text, id=f"{rank}/{i}")


class WriteShard(PipelineStepWithTokenizer):
    """Tokenize (each document + EOS) into datatrove's token file + document-ends index, renamed when complete."""

    name = "flywheel shard writer"
    type = "🔢 - TOKENIZER"

    def __init__(self, folder: Path, tokenizer_file: Path, eos_token: str, max_tokens: int | None):
        super().__init__(str(tokenizer_file), eos_token=eos_token)
        self.folder, self.max_tokens = Path(folder), max_tokens

    def run(self, data, rank: int = 0, world_size: int = 1) -> None:
        tmp, final = f".{rank:05d}.ds.tmp", f"{rank:05d}.ds"
        out = TokenizedFile(str(self.folder), tmp, save_index=True, token_size=self.token_size)
        for batch in batched(data, ROWS_PER_BATCH):
            before = len(out)
            for enc in self.tokenizer.encode_batch([d.text for d in batch]):
                out.write(enc.ids, None)
            self.stat_update("tokens", value=len(out) - before)
            if self.max_tokens and len(out) >= self.max_tokens:
                break  # a streamed hub source: this task's share is read
        out.close()
        os.replace(self.folder / f"{tmp}.index", self.folder / f"{final}.index")
        os.replace(self.folder / tmp, self.folder / final)  # last: the .ds file's presence means complete
        failpoint("token-shard")
