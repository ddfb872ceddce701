"""Every S3 request goes through ``S3Calls.run``: bounded retries with backoff, and one-line errors.

Retried (exponential backoff with jitter, bounded by attempts and by total time, each retry logged
at warning level naming the operation and the object): 5xx answers, 503 SlowDown, RequestTimeout,
timeouts, refused or reset connections. Not retried, mapped to the project's errors: a missing key
(ObjectMissing), a missing bucket (RepositoryNotFound, exit 3), rejected credentials, denied access
and a clock the server rejects (StorageError, exit 10). Messages never hold a secret: they name the
endpoint, bucket, operation and object, and the server's error code.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,  # noqa: A004 - botocore's, covers refused/reset/closed connections
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

from imgbackup.errors import ObjectMissing, RepositoryNotFound, StorageError

log = logging.getLogger("imgbackup.storage")
T = TypeVar("T")

RETRYABLE_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                   "ThrottlingException", "OperationAborted"}
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "InvalidSecurity", "AuthorizationHeaderMalformed"}
MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of the retry loop; the environment tunes them (tests shorten them)."""

    attempts: int = 10  # a server restart or a short network outage rides through ...
    total_seconds: float = 300.0  # ... but a dead server fails the command within 5 minutes
    base_delay: float = 0.5  # first backoff; doubles per attempt
    max_delay: float = 30.0  # one pause never exceeds this

    @classmethod
    def from_env(cls) -> RetryPolicy:
        return cls(attempts=max(1, int(env_float("IMGBACKUP_S3_RETRIES", cls.attempts))),
                   total_seconds=env_float("IMGBACKUP_S3_RETRY_SECONDS", cls.total_seconds),
                   base_delay=env_float("IMGBACKUP_S3_RETRY_BASE", cls.base_delay),
                   max_delay=env_float("IMGBACKUP_S3_RETRY_MAX", cls.max_delay))

    def delay(self, attempt: int) -> float:
        """Full jitter: a random pause up to the exponential bound (racing clients spread out)."""
        return random.uniform(0.5, 1.0) * min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


class S3Calls:
    """Runs requests for one bucket; ``where`` (endpoint and bucket) names it in messages."""

    def __init__(self, endpoint: str, bucket: str, policy: RetryPolicy | None = None) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.policy = policy or RetryPolicy.from_env()
        self.requests = 0  # HTTP requests sent (each attempt of each call), for --json and the tests
        self._count_lock = threading.Lock()  # the pack committers and read-ahead threads share one client

    def _reason(self, exc: BaseException) -> str | None:
        """Why a failure is worth retrying, or None when it is final."""
        if isinstance(exc, ClientError):
            code, status = error_code(exc), _status(exc)
            if code in RETRYABLE_CODES or status >= 500:
                return f"{code or status}"
            return None
        if isinstance(exc, ReadTimeoutError):
            return "timed out"
        if isinstance(exc, ConnectionError | HTTPClientError | Urllib3Error | OSError):
            return "connection refused" if "refused" in str(exc).lower() else "connection failed"
        return None

    def final_error(self, exc: BaseException, op: str, name: str) -> Exception:
        """The project's error for a failure that is not retried (or no longer)."""
        what = f"S3 {op} of {name}" if name else f"S3 {op}"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageError("no S3 credentials found",
                                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
        if not isinstance(exc, ClientError):
            text = type(exc).__name__ if isinstance(exc, BotoCoreError) else str(exc)
            return StorageError(f"{what} failed: {text} ({self.endpoint})")
        code = error_code(exc)
        if code in MISSING_KEY_CODES and op in ("get", "get_range", "size", "modified", "legal hold",
                                                "lock extension"):
            return ObjectMissing(f"object {name} is missing")
        if code == "NoSuchBucket":
            return RepositoryNotFound(f"S3 bucket {self.bucket} does not exist at {self.endpoint}",
                                      "create the bucket first, imgbackup does not create buckets; "
                                      "or check the name in s3://BUCKET/PREFIX")
        if code in CREDENTIAL_CODES:
            return StorageError(f"S3 rejected the credentials ({code}) at {self.endpoint}",
                                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        if code == "RequestTimeTooSkewed":
            return StorageError(f"the S3 server at {self.endpoint} refused the {op} of {name or self.bucket}: "
                                "this machine's clock is off (RequestTimeTooSkewed)",
                                "fix the clock, e.g. timedatectl set-ntp true, and retry")
        if code in ("AccessDenied", "AllAccessDisabled"):
            return StorageError(f"S3 denied the {op} of {name or self.bucket} ({code})",
                                "the credentials lack permission for this bucket or prefix")
        if code == "403":  # a HEAD answer has no body to tell which
            return StorageError(f"S3 refused the {op} of {name or self.bucket} (403)",
                                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and the "
                                "permissions on this bucket or prefix")
        return StorageError(f"{what} failed: {code} ({self.endpoint})")

    def run(self, op: str, name: str, call: Callable[[], T], *, attempt_hook: Callable[[int], None] | None = None) -> T:
        """``call()`` with retries; ``attempt_hook(n)`` runs before each retry (to rewind a body)."""
        started = time.monotonic()
        attempt = 1
        while True:
            with self._count_lock:
                self.requests += 1
            try:
                return call()
            except (BotoCoreError, ClientError, Urllib3Error, OSError) as exc:  # OSError: a reset mid-body
                reason = self._reason(exc)
                elapsed = time.monotonic() - started
                pause = self.policy.delay(attempt)
                if reason is None:
                    raise self.final_error(exc, op, name) from None
                if attempt >= self.policy.attempts or elapsed + pause > self.policy.total_seconds:
                    raise StorageError(
                        f"S3 {op} of {name or self.bucket} failed after {attempt} attempts in {elapsed:.0f} s "
                        f"({reason})", f"check that the server at {self.endpoint} is reachable") from None
                log.warning("S3 %s of %s failed (%s); retry %d of %d in %.1f s", op, name or self.bucket,
                            reason, attempt, self.policy.attempts - 1, pause)
                time.sleep(pause)
                attempt += 1
                if attempt_hook is not None:
                    attempt_hook(attempt)
