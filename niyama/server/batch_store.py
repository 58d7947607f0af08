"""The Batch API's state in one data directory: SQLite (stdlib sqlite3) for files' metadata, batches, and each
batch line's status, attempt count and stored response; uploaded and produced files as plain files in
`files/`. One process owns a directory at a time (an flock on `lock`), so no line runs twice.

Every change is one transaction, committed before the caller goes on: a line's response is stored as soon as
it is answered, so a crash loses at most the lines in flight. WAL with synchronous=NORMAL: durable against a
crash of the process; a power cut may lose the last commits. Not thread-safe by itself beyond a mutex: the
server calls it from one thread (batch_api.py)."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .batch_input import answered_line, new_id, unanswered_line

ACTIVE = ("in_progress", "finalizing", "cancelling")      # a runner owns these
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, endpoint TEXT NOT NULL, model TEXT,
    input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL, deadline REAL NOT NULL, status TEXT NOT NULL,
    created_at INTEGER NOT NULL, in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER,
    failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT, error_file_id TEXT, errors TEXT, metadata TEXT,
    total INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, body TEXT,
    state TEXT NOT NULL DEFAULT 'pending', result TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, line)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);
"""
TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
              "cancelled_at")


class DataDirBusy(RuntimeError):
    pass


def now() -> int:
    return int(time.time())


class BatchStore:
    def __init__(self, data_dir: Path | str):
        self.dir = Path(data_dir).expanduser()
        self.files_dir = self.dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = take_lock(self.dir / "lock")
        self.db = sqlite3.connect(self.dir / "batches.sqlite3", isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._mutex = threading.RLock()
        self._sweep()

    def close(self) -> None:
        with self._mutex:
            self.db.close()
        self._lock.close()

    @contextmanager
    def _tx(self):
        with self._mutex:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _rows(self, sql: str, *args) -> list[sqlite3.Row]:
        with self._mutex:
            return self.db.execute(sql, args).fetchall()

    def _sweep(self) -> None:
        """Files on disk that no row names (a crash between writing and committing): removed."""
        known = {r["id"] for r in self._rows("SELECT id FROM files")}
        for path in self.files_dir.iterdir():
            if path.name not in known:
                path.unlink(missing_ok=True)

    # --- files ---------------------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def new_upload(self) -> tuple[str, Path]:
        """An id for a file being written and where to write it (committed by `add_file`)."""
        file_id = new_id("file-")
        return file_id, self.files_dir / f"{file_id}.part"

    def add_file(self, file_id: str, written: Path, filename: str, purpose: str) -> dict:
        size = written.stat().st_size
        os.replace(written, self.file_path(file_id))
        with self._tx() as db:
            db.execute("INSERT INTO files (id, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
                       (file_id, filename, purpose, size, now()))
        return self.get_file(file_id)

    def get_file(self, file_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM files WHERE id = ?", file_id)
        return file_object(rows[0]) if rows else None

    def list_files(self, after: str | None, limit: int, order: str, purpose: str | None) -> tuple[list[dict], bool]:
        return self._page("files", after, limit, order, ("purpose", purpose), file_object)

    def delete_file(self, file_id: str) -> bool:
        with self._tx() as db:
            gone = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        self.file_path(file_id).unlink(missing_ok=True)
        return bool(gone)

    def stored_uploads(self) -> tuple[int, int]:
        """(count, bytes) of the files clients uploaded (not the batches' outputs)."""
        row = self._rows("SELECT COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS b FROM files WHERE purpose = 'batch'")[0]
        return row["n"], row["b"]

    # --- batches -------------------------------------------------------------------------------------------

    def create_batch(self, batch: dict, lines) -> dict:
        """A batch `in_progress` with its `lines` ((line number, custom_id, body JSON) each), in one transaction:
        an exception from the iterator (invalid input) leaves nothing behind."""
        with self._tx() as db:
            self._insert_batch(db, {**batch, "status": "in_progress", "in_progress_at": batch["created_at"]})
            db.executemany("INSERT INTO lines (batch_id, line, custom_id, body) VALUES (?, ?, ?, ?)",
                           ((batch["id"], n, c, b) for n, c, b in lines))
            db.execute("UPDATE batches SET total = (SELECT COUNT(*) FROM lines WHERE batch_id = ?) WHERE id = ?",
                       (batch["id"], batch["id"]))
        return self.get_batch(batch["id"])

    def create_failed_batch(self, batch: dict, errors: list[dict]) -> dict:
        """A batch whose input failed validation: OpenAI's `failed` status with the problems in `errors`."""
        with self._tx() as db:
            self._insert_batch(db, {**batch, "status": "failed", "failed_at": batch["created_at"],
                                    "errors": json.dumps({"object": "list", "data": errors})})
        return self.get_batch(batch["id"])

    @staticmethod
    def _insert_batch(db, row: dict) -> None:
        db.execute(f"INSERT INTO batches ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))

    def get_batch(self, batch_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM batches WHERE id = ?", batch_id)
        return batch_object(rows[0]) if rows else None

    def batch_deadline(self, batch_id: str) -> float:
        return self._rows("SELECT deadline FROM batches WHERE id = ?", batch_id)[0]["deadline"]

    def list_batches(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return self._page("batches", after, limit, "desc", None, batch_object)

    def active_batches(self) -> list[dict]:
        marks = ", ".join("?" * len(ACTIVE))
        return [batch_object(r) for r in self._rows(f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq",
                                                    *ACTIVE)]

    def count_active(self) -> int:
        marks = ", ".join("?" * len(ACTIVE))
        return self._rows(f"SELECT COUNT(*) AS n FROM batches WHERE status IN ({marks})", *ACTIVE)[0]["n"]

    def move(self, batch_id: str, source: str, status: str) -> bool:
        """`source` -> `status` with its timestamp, if the batch is still in `source`."""
        with self._tx() as db:
            return bool(db.execute(f"UPDATE batches SET status = ?, {status}_at = ? WHERE id = ? AND status = ?",
                                   (status, now(), batch_id, source)).rowcount)

    def _page(self, table: str, after: str | None, limit: int, order: str, where: tuple | None, shape):
        """A page of `limit` rows after the row `after`, newest first ("desc") or oldest first: (objects, has_more)."""
        cond, args = [], []
        if where and where[1] is not None:
            cond.append(f"{where[0]} = ?")
            args.append(where[1])
        if after is not None:
            cond.append(f"seq {'<' if order == 'desc' else '>'} COALESCE((SELECT seq FROM {table} WHERE id = ?), ?)")
            args += [after, 0 if order == "desc" else 2 ** 62]     # an unknown cursor: an empty page, not the first
        sql = (f"SELECT * FROM {table}{' WHERE ' + ' AND '.join(cond) if cond else ''} ORDER BY seq "
               f"{'DESC' if order == 'desc' else 'ASC'} LIMIT ?")
        rows = self._rows(sql, *args, limit + 1)
        return [shape(r) for r in rows[:limit]], len(rows) > limit

    # --- lines ---------------------------------------------------------------------------------------------

    def pending_lines(self, batch_id: str, after: int, limit: int) -> list[tuple[int, str, str]]:
        rows = self._rows("SELECT line, custom_id, body FROM lines WHERE batch_id = ? AND line > ? "
                          "AND state = 'pending' ORDER BY line LIMIT ?", batch_id, after, limit)
        return [(r["line"], r["custom_id"], r["body"]) for r in rows]

    def custom_ids(self, batch_id: str) -> list[str]:
        """The batch's custom_ids in input order."""
        return [r["custom_id"] for r in self._rows("SELECT custom_id FROM lines WHERE batch_id = ? ORDER BY line",
                                                   batch_id)]

    def count_attempt(self, batch_id: str, line: int) -> None:
        """The line goes to the engine now (a count kept across restarts: a line answered is never run again)."""
        with self._tx() as db:
            db.execute("UPDATE lines SET attempts = attempts + 1 WHERE batch_id = ? AND line = ?", (batch_id, line))

    def finish_line(self, batch_id: str, line: int, custom_id: str, status: int, body: dict) -> None:
        """Store a line's answer (status 200: completed, else failed) and count it, in one transaction; a line
        no longer pending (its batch expired or was cancelled meanwhile) is left as it is."""
        result = answered_line(custom_id, status, body)
        state = "completed" if status == 200 else "failed"
        usage = body.get("usage") if status == 200 else None
        usage = usage if isinstance(usage, dict) else {}
        with self._tx() as db:
            if db.execute("UPDATE lines SET state = ?, result = ? WHERE batch_id = ? AND line = ? "
                          "AND state = 'pending'", (state, result, batch_id, line)).rowcount:
                db.execute(f"UPDATE batches SET {state} = {state} + 1, input_tokens = input_tokens + ?, "
                           "output_tokens = output_tokens + ? WHERE id = ?",
                           (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), batch_id))

    def finalize(self, batch_id: str, status: str, unanswered: dict | None) -> dict:
        """Write the output file (answered lines) and the error file (failed lines, and with `unanswered` the
        lines that never ran, which then count as failed), in input order, and end the batch in `status`.
        Idempotent until it commits: a crash before that leaves the batch to be finalized again."""
        paths = {kind: self.new_upload() for kind in ("output", "error")}
        counts = {"output": 0, "error": 0}
        with self._mutex, open(paths["output"][1], "w") as out, open(paths["error"][1], "w") as err:
            for row in self.db.execute("SELECT custom_id, state, result FROM lines WHERE batch_id = ? ORDER BY line",
                                       (batch_id,)):
                if row["state"] == "completed":
                    out.write(row["result"] + "\n")
                    counts["output"] += 1
                elif row["state"] == "failed":
                    err.write(row["result"] + "\n")
                    counts["error"] += 1
                elif unanswered is not None:
                    err.write(unanswered_line(row["custom_id"], unanswered) + "\n")
                    counts["error"] += 1
            for f in (out, err):
                f.flush()
                os.fsync(f.fileno())
        ids = {}
        for kind, (file_id, written) in paths.items():
            if counts[kind]:
                os.replace(written, self.file_path(file_id))
                ids[kind] = file_id
            else:
                written.unlink()
        stamp = now()
        with self._tx() as db:
            for kind, file_id in ids.items():
                db.execute("INSERT INTO files (id, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
                           (file_id, f"{batch_id}_{kind}.jsonl", "batch_output",
                            self.file_path(file_id).stat().st_size, stamp))
            never_ran = db.execute("UPDATE lines SET state = ? WHERE batch_id = ? AND state = 'pending'",
                                   (status, batch_id)).rowcount
            # the answers live in the files now; the rows keep each line's state and attempts
            db.execute("UPDATE lines SET body = NULL, result = NULL WHERE batch_id = ?", (batch_id,))
            db.execute(f"UPDATE batches SET status = ?, {status}_at = ?, finalizing_at = COALESCE(finalizing_at, ?), "
                       "output_file_id = ?, error_file_id = ?, failed = failed + ? WHERE id = ?",
                       (status, stamp, stamp, ids.get("output"), ids.get("error"), never_ran, batch_id))
        return self.get_batch(batch_id)


def take_lock(path: Path):
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise DataDirBusy(f"the data directory {path.parent} is in use by another niyama process (pid {holder}); "
                          "give this one its own --data-dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def file_object(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


def batch_object(row: sqlite3.Row) -> dict:
    """A batch as OpenAI's Batch object."""
    out = {"id": row["id"], "object": "batch", "endpoint": row["endpoint"], "model": row["model"],
           "errors": json.loads(row["errors"]) if row["errors"] else None, "input_file_id": row["input_file_id"],
           "completion_window": row["completion_window"], "status": row["status"],
           "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
           "created_at": row["created_at"], "expires_at": int(row["deadline"])}
    out.update({key: row[key] for key in TIMESTAMPS})
    out["request_counts"] = {"total": row["total"], "completed": row["completed"], "failed": row["failed"]}
    out["metadata"] = json.loads(row["metadata"]) if row["metadata"] else None
    tokens_in, tokens_out = row["input_tokens"], row["output_tokens"]
    out["usage"] = {"input_tokens": tokens_in, "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": tokens_out, "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": tokens_in + tokens_out}
    return out
