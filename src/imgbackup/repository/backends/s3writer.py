"""The streamed writer of an S3 repository (s3.py): what is written waits in a spool (a temp file)
and goes up as one PutObject at commit, or past the storage's multipart threshold as a multipart upload
that becomes visible only at CompleteMultipartUpload (abort = AbortMultipartUpload)."""

from __future__ import annotations

import bisect
import io
import itertools
import os
import tempfile
import threading
from typing import TYPE_CHECKING

from imgbackup.errors import StorageError
from imgbackup.repository.backends.s3calls import log
from imgbackup.repository.backends.s3lock import content_md5

if TYPE_CHECKING:
    from imgbackup.repository.backends.s3 import S3Storage


class PiecesReader(io.RawIOBase):
    """A seekable file over a list of byte strings: a request body sent without joining them first
    (botocore reads it once to sign the payload, rewinds, and reads it again to send it)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = pieces
        self._starts = list(itertools.accumulate((len(p) for p in pieces), initial=0))
        self._size = self._starts[-1]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(base + offset, 0), self._size)
        return self._pos

    def readinto(self, buffer) -> int:
        out = memoryview(buffer).cast("B")
        done = 0
        while done < len(out) and self._pos < self._size:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            piece = self._pieces[i]
            at = self._pos - self._starts[i]
            n = min(len(out) - done, len(piece) - at)
            out[done:done + n] = piece[at:at + n]
            done += n
            self._pos += n
        return done


class _Spool:
    """What a writer has been given and not yet sent: in an unlinked temp file (``$TMPDIR``) so a pack
    waiting for its PUT costs page cache, not process memory (three 16 MiB packs were a quarter of a
    backup's peak RSS); in memory, as the pieces written, when no temp file can be made."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.start = 0    # bytes already sent as parts
        self.size = 0
        try:
            self.file = tempfile.TemporaryFile(prefix="imgbackup-s3-", buffering=0)  # noqa: SIM115 (closed by close())
        except OSError:
            self.file = None

    def write(self, data) -> None:
        if self.file is not None:
            view = memoryview(data)
            while view:
                view = view[self.file.write(view):]
        else:
            self.pieces.append(data if type(data) is bytes else bytes(data))
        self.size += len(data)

    @property
    def held(self) -> int:
        return self.size - self.start

    def take(self, size: int) -> bytes:
        """The first ``size`` bytes not yet sent, out of the spool."""
        size = min(size, self.held)
        if self.file is not None:
            data = os.pread(self.file.fileno(), size, self.start)
            if len(data) != size:
                raise StorageError(f"the temp file of an upload returned {len(data)} of {size} bytes")
        else:
            joined = b"".join(self.pieces)
            data, rest = joined[:size], joined[size:]
            self.pieces = [rest] if rest else []
        self.start += size
        return data

    def body(self):
        """A seekable reader of everything (nothing sent yet): botocore reads it to sign, rewinds, sends."""
        if self.file is not None:
            self.file.seek(0)
            return self.file
        return PiecesReader(self.pieces)

    def close(self) -> None:
        self.pieces, self.start, self.size = [], 0, 0
        if self.file is not None:
            self.file.close()
            self.file = None


class S3ObjectWriter:
    """Spools up to the storage's threshold (``_Spool``: a temp file); past it, a multipart upload
    (one part read back and sent at a time). Nothing is visible under the name before ``commit``;
    ``abort`` aborts the upload."""

    def __init__(self, storage: S3Storage, name: str) -> None:
        self.storage = storage
        self.name = name
        self.key = storage.key(name)
        self._spool = _Spool()
        self._upload_id: str | None = None
        self._parts: list[dict] = []
        self._closed = False
        self._lock = threading.Lock()  # commit runs on the pack committer's thread

    def write(self, data) -> None:
        if self._closed:
            raise ValueError(f"writer of {self.name} is closed")
        self._spool.write(data)
        if self._upload_id is None and self._spool.held <= self.storage.multipart_threshold:
            return
        while self._spool.held >= self.storage.part_size:
            self._send_part(self.storage.part_size)

    def _send_part(self, size: int) -> None:
        st = self.storage
        locked = st.lock.put_args(self.name, None) if st.lock else {}
        if self._upload_id is None:
            self._upload_id = st.calls.run("multipart start", self.name, lambda: st.client.create_multipart_upload(
                Bucket=st.bucket, Key=self.key, **locked)["UploadId"])
        body = self._spool.take(size)
        number = len(self._parts) + 1
        digest = {"ContentMD5": content_md5(body)} if locked else {}   # S3 wants it on Object-Lock writes
        etag = st.calls.run("multipart part", self.name, lambda: st.client.upload_part(
            Bucket=st.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=body, **digest)["ETag"])
        self._parts.append({"PartNumber": number, "ETag": etag})

    def commit(self) -> None:
        with self._lock:
            if self._closed:
                raise ValueError(f"writer of {self.name} is closed")
            st = self.storage
            try:
                if self._upload_id is None and st.lock:   # Object Lock: the retention and MD5 of put()
                    st.put(self.name, self._spool.take(self._spool.held))
                elif self._upload_id is None:
                    size = self._spool.size   # each attempt reads the spool from its start
                    st.calls.run("put", self.name, lambda: st.client.put_object(
                        Bucket=st.bucket, Key=self.key, Body=self._spool.body(), ContentLength=size))
                else:
                    if self._spool.held:
                        self._send_part(self._spool.held)
                    parts = {"Parts": self._parts}
                    st.calls.run("multipart complete", self.name, lambda: st.client.complete_multipart_upload(
                        Bucket=st.bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload=parts))
            except BaseException:
                self._abort_upload()
                raise
            self._closed = True
            self._spool.close()

    def _abort_upload(self) -> None:
        """Abort the upload on the server; when that fails too (the server is down), the next writer's
        ``remove_incomplete_writes`` aborts it, so the failure that brought us here is the one reported."""
        self._closed = True
        self._spool.close()
        upload, self._upload_id = self._upload_id, None
        if upload is None:
            return
        try:
            self.storage.abort_upload(self.key, upload)
        except StorageError as exc:
            log.warning("could not abort the upload of %s (%s); the next backup removes it", self.name, exc)

    def abort(self) -> None:
        with self._lock:
            self._abort_upload()
