"""The one redaction rule for every value that can leave the process: MLflow params and tags, logs,
the CLI's error messages, `job_runs.error` and config fingerprints.

A credential is hidden as `***`, wherever it sits:

- a setting whose name matches Spark's own default `spark.redaction.regex`
  (`(?i)secret|password|token|access[.]?key`), or Azure's `fs.azure.account.key.*` and
  `fs.azure.sas.*`: the whole value (`redact_settings`, and `name=value` / `"name": "value"` in text);
- the password of a URI's `user:password@` (`https://mlflow:pw@host`, `postgresql://u:pw@db/mlflow`);
- a query or `;key=value` parameter named like a credential (`?sig=` of an Azure SAS, `X-Amz-Signature`,
  Spark Connect's `sc://host:15002/;token=...`).

What is left (user names, hosts, paths, bucket and container names) still tells where a run went.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

#: Spark's default `spark.redaction.regex`, plus Azure's storage account keys and SAS tokens.
SECRET_NAME = r"secret|password|token|access[.]?key|fs[.]azure[.]account[.]key|fs[.]azure[.]sas"
_SECRET_NAME = re.compile(SECRET_NAME, re.IGNORECASE)
# user:password@ after a scheme; a lone `name@` is kept (wasbs://container@account is no secret).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/@\s:'\"]*):[^/@\s'\"]*@")
# ?name=, &name= and ;name= parameters whose name says credential (sig: Azure SAS signatures). The
# bare names `sig` and `key` count only as parameters (after ?, & or ;): in prose `KEY=VALUE` is no
# secret (the CLI's own usage message says it).
_PARAMETER = re.compile(
    r"(?i)((?:(?:^|(?<=[?&;\s]))[\w.-]*(?:" + SECRET_NAME
    + r"|signature|credential|passwd|pwd|apikey|api_key)[\w.-]*|(?<=[?&;])(?:sig|key))=)[^&;#\s'\"]+"
)
# name=value, name: value, "name": "value" of a setting named like a credential, in free text.
_NAMED = re.compile(
    r"(?i)([\w.-]*(?:" + SECRET_NAME + r")[\w.-]*['\"]?\s*[=:]\s*['\"]?)(?!\*\*\*)[^\s'\",;&})\]]+"
)


def is_secret_name(name: str) -> bool:
    """True when a setting of this name holds a credential (its whole value is hidden)."""
    return bool(_SECRET_NAME.search(name))


def redact(text: Any) -> str:
    """`text` (made a string) with every credential the rule finds replaced by `***`."""
    text = _USERINFO.sub(rf"\1:{REDACTED}@", str(text))
    text = _PARAMETER.sub(rf"\1{REDACTED}", text)
    return _NAMED.sub(rf"\1{REDACTED}", text)


def redact_settings(settings: Mapping[str, Any]) -> dict[str, str]:
    """A copy of name -> value settings (Spark conf, MLflow params and tags) with the values of
    secret-named settings hidden whole and credentials inside the other values hidden."""
    return {name: REDACTED if is_secret_name(name) else redact(value) for name, value in settings.items()}


class RedactingFormatter(logging.Formatter):
    """Formats a record (message, arguments, traceback) as usual, then redacts the line: a log
    call never has to remember which of its values might hold a credential."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
