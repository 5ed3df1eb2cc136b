"""The configuration schema.

Every model forbids unknown keys and is frozen, so a typo is an error that names
the dotted key, and nothing changes settings behind the daemon's back. Relative
paths are resolved against the directory holding the config file (load.py).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from archive.config.cron import cron_trigger
from archive.config.syslog_url import parse_url
from archive.object_names import is_safe_key
from archive.uids import InvalidAETitle, InvalidUID, validate_ae_title, validate_uid

MiB = 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DicomSettings(_Strict):
    ae_title: str = "PACSVAULT"
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    # Off only when the config says so: unknown peers are refused at association.
    allow_any_peer: bool = False
    # Refuse associations addressed to another called AE title (dcmtk's default is ANY-SCP).
    check_called_ae: bool = False
    # Worker processes sharing the port (SO_REUSEPORT); 0 = one per CPU core.
    workers: int = Field(0, ge=0, le=64)
    max_associations: int = Field(32, ge=1, le=1000)
    # Connections from one source address that have not sent their A-ASSOCIATE-RQ yet, per
    # worker: an attacker's idle sockets from one host cannot take every slot until ARTIM
    # closes them, while a PACS that opens many associations at once is not limited
    # (pacsvault engine).
    max_pending_per_source: int = Field(8, ge=1, le=1000)
    network_timeout_s: float = Field(60, gt=0)
    max_pdu: int = Field(262144, ge=0)
    # A data set up to this size stays in memory until it is stored (no spool file to
    # write and read back); a larger one goes to the spool as it arrives. Memory per
    # association is at most this plus one PDU (pacsvault engine).
    in_memory_max_bytes: int = Field(1 << 20, ge=0, le=64 << 20)
    # The DICOM engine behind the listener: pacsvault's own (archive/dicom/net: bounded,
    # 1.5-2.5x the objects/s of pynetdicom here) or pynetdicom (the earlier listener, kept
    # as a fallback for one release).
    engine: Literal["pacsvault", "pynetdicom"] = "pacsvault"
    # pynetdicom polls with 1 ms sleeps per message; shorter helps a bare acceptor (+25 %)
    # but measured no gain behind the full ingest path (docs/performance.md), so it stays.
    reactor_sleep_s: float = Field(0.001, gt=0, le=0.01)
    # On SIGTERM, open associations get this long to finish before they are aborted.
    shutdown_grace_s: float = Field(30, ge=0)
    # C-FIND: a query with more matches is refused whole (0xA700), never cut short
    max_query_matches: int = Field(1000, ge=1, le=100_000)
    query_case_insensitive_pn: bool = True   # PS3.4 lets the SCP choose; most archives do
    # DICOM TLS (PS3.15 Annex B, TLS 1.2+) on a second port; None = off.
    tls_port: int | None = Field(None, ge=1, le=65535)
    tls_only: bool = False              # true: no plain listener on `port`
    tls_cert: Path | None = None        # PEM, server certificate (chain)
    tls_key: Path | None = None         # PEM, its private key (mode 600)
    tls_ca: Path | None = None          # PEM bundle that client certificates must chain to
    tls_require_client_cert: bool = False

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        try:
            return validate_ae_title(v)
        except InvalidAETitle as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _tls(self) -> "DicomSettings":
        if self.tls_port is None:
            if self.tls_only:
                raise ValueError("tls_only = true needs tls_port")
            return self
        if self.tls_cert is None or self.tls_key is None:
            raise ValueError("tls_port is set: tls_cert and tls_key (PEM files) are required")
        if self.tls_port == self.port and not self.tls_only:
            raise ValueError("tls_port must differ from port (or set tls_only = true)")
        if self.tls_require_client_cert and self.tls_ca is None:
            raise ValueError("tls_require_client_cert = true needs tls_ca "
                             "(the CA that client certificates are checked against)")
        return self


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable


class HttpSettings(_Strict):
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # HTTPS with this certificate (PEM) and key; both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Plain HTTP is refused off loopback unless this says the network is trusted.
    allow_plain_off_loopback: bool = False
    # STOW-RS: the largest request body taken (each part is spooled to disk as it
    # arrives; a bigger body is refused with 413 before it is stored).
    stow_max_bytes: int = Field(4 * 1024**3, ge=1024 * 1024)
    # Requests served at once; more wait in the kernel's queue or get 503.
    max_concurrency: int = Field(64, ge=4, le=4096)
    # A request's head must arrive whole within this, and its body must not stall for
    # longer: a client that dribbles bytes (slowloris) is cut off, not waited for.
    request_timeout_s: float = Field(30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _tls(self) -> "HttpSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (both PEM files)")
        if self.tls_cert is None and not is_loopback(self.bind) \
                and not self.allow_plain_off_loopback:
            raise ValueError(f"bind = {self.bind!r} is not loopback and HTTPS is off: set "
                             "tls_cert and tls_key, or allow_plain_off_loopback = true "
                             "if this network is trusted")
        return self


class CatalogSettings(_Strict):
    # sqlite:///relative/or/absolute.db or postgresql+psycopg://user@host/db.
    # PACSVAULT_CATALOG_URL in the environment overrides it (keeps passwords out of files).
    url: str = "sqlite:///catalog/catalog.db"
    # Catalog backups (`pacsvault catalog backup`) kept on each place, newest first.
    backup_keep: int = Field(14, ge=1, le=10_000)
    # The daemon takes one on this cron schedule (5 fields, UTC); "" = by hand only.
    backup_schedule: str = "15 * * * *"

    @field_validator("backup_schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        return LifecycleSettings._cron(v)


class SiteSettings(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    path: Path


class IngestSettings(_Strict):
    spool_dir: Path = Path("spool")
    # "device": drop the page cache before the verify read so it reaches the disk;
    # "cache": verify from the page cache (faster, proves less).
    verify_read: Literal["device", "cache"] = "device"
    # A site with less free space than this is treated as full before writing.
    min_free_bytes: int = Field(64 * 1024 * 1024, ge=0)
    # A site write that takes longer than this counts as failed for that object.
    site_timeout_s: float = Field(30, gt=0)
    # A failed site is not tried again for this long (the next object goes to the healthy one).
    site_retry_after_s: float = Field(5, ge=0)
    # How often the daemon re-copies under-replicated objects to returned sites.
    repair_interval_s: float = Field(5, gt=0)
    # Verified copies needed before C-STORE success. 1: with a site down the object is
    # accepted on the healthy one, marked under-replicated and repaired when the site
    # returns (ingest goes on through an outage). 2: with a site down C-STORE answers
    # Out of Resources and the sender keeps the object (no single-copy window).
    min_copies: int = Field(1, ge=1, le=2)


class S3Settings(_Strict):
    """Where and how the object tier stores objects on an S3-compatible server
    (tiers/s3.py). Credentials are never in here: only the NAMES of the environment
    variables holding them (empty names: boto3's own chain, e.g. an instance role)."""

    bucket: str = Field(min_length=1)
    endpoint_url: str | None = None     # None: AWS
    prefix: str = ""                    # every key is stored under it
    region: str = "us-east-1"
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    storage_class: str | None = None    # e.g. STANDARD_IA, GLACIER_IR
    sse: Literal["none", "AES256", "aws:kms"] = "none"
    kms_key_id: str | None = None
    object_lock_mode: Literal["none", "GOVERNANCE", "COMPLIANCE"] = "none"
    retain_days: int = Field(0, ge=0)
    multipart_threshold: int = Field(16 * MiB, ge=1)
    part_size: int = Field(16 * MiB, ge=5 * MiB, le=5 * 1024 * MiB)   # S3's part limits
    max_concurrency: int = Field(4, ge=1, le=64)
    checksum: Literal["sha256", "md5", "none"] = "sha256"   # md5: Ceph RGW
    verify: Literal["checksum", "readback"] = "checksum"    # server's SHA-256 | read back
    conditional_writes: bool = True     # send If-None-Match: * (off for old servers)
    max_attempts: int = Field(5, ge=1, le=20)   # botocore standard retries, first try included
    connect_timeout: float = Field(10, gt=0)
    read_timeout: float = Field(60, gt=0)
    path_style: bool = True             # bucket in the path: MinIO, Ceph, SeaweedFS
    # Plain http:// to an endpoint off this host sends the credentials' signatures and
    # every bundle (patient data) in the clear: refused unless the network is trusted.
    allow_plain_http: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "S3Settings":
        if self.endpoint_url:
            from urllib.parse import urlsplit
            u = urlsplit(self.endpoint_url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"endpoint_url {self.endpoint_url!r} is not an http(s) URL")
            if u.scheme == "http" and not is_loopback(u.hostname) \
                    and not self.allow_plain_http:
                raise ValueError(f"endpoint_url {self.endpoint_url!r} is plain HTTP to another "
                                 "host: bundles (patient data) would cross the network "
                                 "unencrypted; use https://, or set allow_plain_http = true "
                                 "only on a network you trust")
        if self.sse != "aws:kms" and self.kms_key_id:
            raise ValueError("kms_key_id needs sse = 'aws:kms'")
        if self.object_lock_mode != "none" and self.retain_days < 1:
            raise ValueError("object lock needs retain_days >= 1")
        # AWS refuses a locked PUT without Content-MD5 or a checksum header.
        if self.object_lock_mode != "none" and self.checksum == "none":
            raise ValueError("object lock needs checksum = 'sha256' or 'md5'")
        p = self.prefix.strip("/")
        if p and not is_safe_key(p):
            raise ValueError(f"prefix {self.prefix!r} is not a safe object name")
        return self

    @property
    def key_prefix(self) -> str:
        p = self.prefix.strip("/")
        return f"{p}/" if p else ""


S3TierSettings = S3Settings       # the name [objects.s3] had before there was one model


class ObjectTierSettings(_Strict):
    """The long-term tier. kind="directory" (the embedded default) keeps bundles
    under ``path``; kind="s3" uses [objects.s3]. Both sit behind one Backend."""

    name: str = Field("objects", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    kind: Literal["directory", "s3"] = "directory"
    path: Path = Path("objects")
    s3: S3Settings | None = None
    # zstd level per instance frame. Measured on CT-like pixels (bench/tiering.py):
    # level 1 ~680 MB/s for 1.42x, level 3 ~175 MB/s for 1.50x; a migration is
    # bound by the upload, so 1.
    compression_level: int = Field(1, ge=1, le=19)

    @model_validator(mode="after")
    def _kind(self) -> "ObjectTierSettings":
        if self.kind == "s3" and self.s3 is None:
            raise ValueError("kind = 's3' needs an [objects.s3] table")
        return self


class LifecycleRule(_Strict):
    """A study matches a rule when EVERY condition the rule sets holds."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")
    older_than_days: int | None = Field(None, ge=0)
    age_from: Literal["study_date", "received"] = "study_date"
    not_accessed_days: int | None = Field(None, ge=0)
    modalities: tuple[str, ...] = ()
    calling_aes: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _has_condition(self) -> "LifecycleRule":
        if (self.older_than_days is None and self.not_accessed_days is None
                and not self.modalities and not self.calling_aes):
            raise ValueError(f"rule {self.name!r} has no condition (it would move everything)")
        return self


class LifecycleSettings(_Strict):
    """Which studies move to the object tier (tiers/policy.py)."""

    # Nothing received (or recalled) more recently than this moves, whatever the rules say.
    min_online_days: int = Field(30, ge=0)
    # A recalled study stays online at least this long after its recall.
    keep_recalled_days: int = Field(7, ge=0)
    never_migrate_studies: tuple[str, ...] = ()
    never_migrate_patients: tuple[str, ...] = ()
    rules: tuple[LifecycleRule, ...] = (
        LifecycleRule(name="older-than-1-year", older_than_days=365),
    )
    # Delete the online copies once the object copy is verified (false: copy only).
    purge_online: bool = True
    # The daemon runs the policy on this cron schedule (5 fields); "" turns it off.
    schedule: str = "30 1 * * *"
    # At most this many studies per run (a run resumes where the last one stopped).
    max_studies_per_run: int = Field(10_000, ge=1)

    @field_validator("never_migrate_studies")
    @classmethod
    def _uids(cls, v: tuple[str, ...]) -> tuple[str, ...]:

        try:
            return tuple(validate_uid(u, "Study Instance") for u in v)
        except InvalidUID as e:
            raise ValueError(str(e)) from None

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        if v.strip():
            try:
                cron_trigger(v)
            except ValueError as e:
                raise ValueError(f"not a 5-field cron expression: {e}") from None
        return v


class ScrubSettings(_Strict):
    """Integrity scrubs of the online sites (replication/scrub.py)."""

    # Read rate cap over all threads, MB/s; 0 = as fast as the disks go. A cap
    # keeps a scrub from starving ingest on shared disks.
    max_mb_per_s: float = Field(200, ge=0)
    threads: int = Field(2, ge=1, le=16)
    # The daemon scrubs every site on this cron schedule (5 fields); "" = only by hand.
    schedule: str = "0 3 * * 0"
    # ... and reads every study bundle on the object tier back on this one (monthly:
    # an S3 provider may charge for the reads); "" = only by hand (--tier objects).
    objects_schedule: str = "0 4 1 * *"

    @field_validator("schedule", "objects_schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        return LifecycleSettings._cron(v)


SYSLOG_FACILITIES = Literal["kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news",
                            "uucp", "cron", "authpriv", "ftp", "local0", "local1", "local2",
                            "local3", "local4", "local5", "local6", "local7"]


class AlertSettings(_Strict):
    """Hooks that findings are sent to (archive/alerts.py). None by default: alerts
    then only reach the daemon log. Secrets only by environment variable NAME."""

    # Alerts below this severity go to the log only.
    min_severity: Literal["warning", "critical"] = "warning"
    # argv (no shell); gets the alert as JSON on stdin and PACSVAULT_ALERT_* variables.
    command: tuple[str, ...] | None = None
    command_timeout_s: float = Field(30, gt=0)
    # POSTed the alert as JSON. The Authorization token comes from the variable named here.
    webhook_url: str | None = None
    webhook_token_env: str | None = None
    webhook_timeout_s: float = Field(10, gt=0)
    syslog: bool = False
    # A unix socket path, or host:port for UDP ([v6]:port for IPv6).
    syslog_address: str = "/dev/log"
    syslog_facility: SYSLOG_FACILITIES = "daemon"
    # The daemon's watch (archive/app/watch.py): how often it looks, and its thresholds.
    watch_interval_s: float = Field(60, ge=1, le=3600)
    catalog_backup_max_age_h: float = Field(26, gt=0)       # the newest on a site is older
    failed_logins: int = Field(10, ge=1)                    # log-in failures within ...
    failed_logins_window_min: float = Field(15, gt=0)       # ... this many minutes
    offsite_after_days: float = Field(7, ge=0)              # a sealed volume still on site

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, raw: object) -> object:
        # extra="forbid" refuses these too; this says what to do instead.
        if isinstance(raw, dict):
            for key in raw:
                if any(w in key for w in ("token", "secret", "password")) \
                        and not key.endswith("_env"):
                    raise ValueError(
                        f"{key}: secrets never go in the config file; put the token in an "
                        "environment variable and name it with webhook_token_env")
        return raw

    @field_validator("command", mode="before")
    @classmethod
    def _argv(cls, v: object) -> object:
        if v is not None and (not isinstance(v, (list, tuple)) or not v
                              or not all(isinstance(a, str) for a in v) or not v[0]):
            raise ValueError('must be a non-empty list of strings (argv, run without a shell), '
                             'e.g. ["/usr/local/bin/page-oncall", "--team", "pacs"]')
        return v

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from urllib.parse import urlsplit

        try:
            u = urlsplit(v)
            u.port  # noqa: B018  (raises on a bad port)
        except ValueError as e:
            raise ValueError(f"not a valid URL: {e}") from None
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if u.username or u.password:
            raise ValueError("credentials in the URL are refused; put the token in an "
                             "environment variable and name it with webhook_token_env")
        return v

    @field_validator("webhook_token_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        # Upper case only: a pasted token (mixed case, hex) fails here instead of being used.
        if v is not None and not re.fullmatch(r"[A-Z_][A-Z0-9_]{0,127}", v):
            raise ValueError("must be the NAME of an environment variable holding the token "
                             "(upper case, e.g. PACSVAULT_WEBHOOK_TOKEN), not the token")
        return v

    @field_validator("syslog_address")
    @classmethod
    def _syslog_address(cls, v: str) -> str:
        if v.startswith("/"):
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError("must be a unix socket path (e.g. /dev/log) or host:port (UDP)")
        if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
            raise ValueError("an IPv6 address needs brackets: [::1]:514")
        return v

    @model_validator(mode="after")
    def _token_needs_url(self) -> "AlertSettings":
        if self.webhook_token_env and not self.webhook_url:
            raise ValueError("webhook_token_env is set but webhook_url is not")
        return self


AGE_RECIPIENT = r"^age1[02-9ac-hj-np-z]{58}$"


class DrSettings(_Strict):
    """DR volumes (dr/; docs/formats/dr-volume.md, docs/operations/dr.md)."""

    # Volumes of one pool form sets; every study gets one DR copy per pool.
    pool: str = Field("offsite", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    # Public age recipients (the DR key and an escrow key). The daemon never holds
    # an identity: it can write volumes but not read them back.
    recipients: tuple[str, ...] = ()
    # "stream": a tape device (/dev/nst0), a FIFO or a file; "{barcode}" in the path
    # makes one file per volume (the embedded default). "ltfs": a mounted LTFS
    # directory; each volume is the directory <device>/<barcode>/ (LTFS LE layout).
    kind: Literal["stream", "ltfs"] = "stream"
    device: str = "dr/volumes/{barcode}.tar"
    capacity: int = Field(18_000_000_000_000, ge=262_144)     # LTO-9 native
    block_size: int = Field(256 * 1024, ge=512, le=16 * 1024 * 1024)
    # A study is cut into encrypted segments of at most this many instance bytes
    # (larger instances into parts): it bounds memory and the space lost at a volume's end.
    segment_bytes: int = Field(32 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
    zstd_level: int = Field(1, ge=1, le=19)
    barcode_prefix: str = Field("PV", pattern=r"^[A-Z0-9]{1,4}$")
    # Volumes may be recycled this long after they were sealed.
    retain_days: int = Field(3650, ge=1)
    # The daemon writes pending studies on this cron schedule ("" = by hand only).
    schedule: str = "0 2 * * *"

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for r in v:
            if r.startswith("AGE-SECRET-KEY-"):
                raise ValueError("an age identity (secret key) does not belong in the config: "
                                 "give its public recipient (age1...) and keep the identity offline")
            if not re.match(AGE_RECIPIENT, r):
                raise ValueError(f"not an age X25519 recipient (age1... , 62 characters): {r[:12]}...")
        return v

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        return LifecycleSettings._cron(v)

    @model_validator(mode="after")
    def _sizes(self) -> "DrSettings":
        if self.capacity < 4 * self.segment_bytes:
            raise ValueError("capacity must be at least 4 x segment_bytes")
        return self


class DrillSettings(_Strict):
    """Scheduled restore drills (dr/drill.py). DR volumes need the identity, which
    the daemon never holds: drill them by hand (pacsvault drill --tier dr --identity)."""

    sample: int = Field(3, ge=1, le=10_000)            # studies per tier
    tiers: tuple[Literal["online", "objects"], ...] = ("online", "objects")
    schedule: str = "0 5 1 * *"                        # monthly; "" = by hand only

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        return LifecycleSettings._cron(v)


class AccountSettings(_Strict):
    """Operator accounts (archive/auth.py): the password policy, lockout, sessions."""

    min_length: int = Field(12, ge=8, le=256)
    min_classes: int = Field(3, ge=1, le=4)          # of lower, upper, digit, other
    history: int = Field(5, ge=0, le=50)             # no reuse of the last N passwords
    max_age_days: int = Field(365, ge=0)             # 0: passwords do not expire
    lockout_after: int = Field(5, ge=1, le=100)      # failed log-ins before a lock
    lockout_base_s: int = Field(60, ge=1)            # first lock; doubles with each failure
    lockout_max_s: int = Field(3600, ge=1)
    session_hours: float = Field(8, gt=0, le=24 * 7)


class AuditSettings(_Strict):
    """Audit records as DICOM audit messages (IHE ATNA) to a syslog collector (archive/atna.py)."""

    # "" = off; "udp://host:port" (RFC 5426) or "tls://host:port" (RFC 5425; 6514 is usual).
    syslog: str = ""
    syslog_ca: Path | None = None       # PEM CA the collector's certificate must chain to (tls)
    syslog_cert: Path | None = None     # PEM client certificate, for collectors that want one
    syslog_key: Path | None = None      # its private key (mode 600)
    enterprise_site_id: str = Field("", max_length=64)    # AuditEnterpriseSiteID; "" = none
    ae_title: str = ""                  # our UserID in the messages; "" = dicom.ae_title
    timeout_s: float = Field(5, gt=0, le=120)             # connect/send; the caller never waits
    queue_size: int = Field(10_000, ge=1, le=1_000_000)   # unused: the trail is the queue
    held_alert_s: float = Field(300, ge=1, le=7 * 86400)  # an outage this long: one alert
    # The daemon checks the keyed chain (audit --verify) on this cron schedule and
    # alerts on a failure; "" = by hand only.
    verify_schedule: str = "45 * * * *"

    @field_validator("verify_schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        return LifecycleSettings._cron(v)

    @field_validator("syslog")
    @classmethod
    def _url(cls, v: str) -> str:
        if v:
            parse_url(v)                # ValueError says what is wrong
        return v

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        try:
            return validate_ae_title(v) if v else v
        except InvalidAETitle as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _tls(self) -> "AuditSettings":
        tls = self.syslog.startswith("tls://")
        if tls and self.syslog_ca is None:
            raise ValueError("syslog = tls://...: syslog_ca (the PEM CA that signed the "
                             "collector's certificate) is required")
        if not tls and (self.syslog_ca or self.syslog_cert or self.syslog_key):
            raise ValueError("syslog_ca, syslog_cert and syslog_key are for syslog = tls://...")
        if (self.syslog_cert is None) != (self.syslog_key is None):
            raise ValueError("syslog_cert and syslog_key go together (both PEM files)")
        return self


class Settings(_Strict):
    config_path: Path | None = None
    data_dir: Path = Path(".")
    dicom: DicomSettings = DicomSettings()
    http: HttpSettings = HttpSettings()
    catalog: CatalogSettings = CatalogSettings()
    sites: tuple[SiteSettings, ...] = (
        SiteSettings(name="site-a", path=Path("sites/a")),
        SiteSettings(name="site-b", path=Path("sites/b")),
    )
    ingest: IngestSettings = IngestSettings()
    objects: ObjectTierSettings = ObjectTierSettings()
    lifecycle: LifecycleSettings = LifecycleSettings()
    scrub: ScrubSettings = ScrubSettings()
    dr: DrSettings = DrSettings()
    drill: DrillSettings = DrillSettings()
    accounts: AccountSettings = AccountSettings()
    alerts: AlertSettings = AlertSettings()
    audit: AuditSettings = AuditSettings()

    @model_validator(mode="after")
    def _sites_distinct(self) -> "Settings":
        if not self.sites:
            raise ValueError("sites: at least one online site is required")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("sites: site names must be unique")
        paths = [s.path for s in self.sites]
        if len(set(paths)) != len(paths):
            raise ValueError("sites: two sites share one path; mirrors must be distinct")
        if self.ingest.min_copies > len(self.sites):
            raise ValueError(f"ingest.min_copies: {self.ingest.min_copies} copies need as "
                             f"many sites; {len(self.sites)} configured")
        if self.objects.name in names:
            raise ValueError("objects.name: must differ from every site name")
        if self.objects.kind == "directory" and self.objects.path in paths:
            raise ValueError("objects.path: must differ from every site path")
        return self
