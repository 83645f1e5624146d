"""Django settings for the Job Gateway.

Every value comes from ``gateway_project.config``: the environment, then the
JSON file named by ``SETTINGS_FILE``, then the defaults below. ``REDIS_URL``
decides, here and nowhere else, which queue, channel layer and cache are used.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

from gateway_project.config import Config, available_cores, redact_url
from jobs.filters import FilterError, parse_tiers

# Lets the admin and querysets take type parameters at run time (ModelAdmin[Job]).
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent
config = Config.load(os.environ, BASE_DIR)

# --- Django -------------------------------------------------------------------

DEBUG = config.boolean("DEBUG", False)
# Empty when unset: Django then refuses to sign sessions, and serving refuses to
# start (gateway_project.asgi); migrate and the tests need no secret.
SECRET_KEY = config.string("DJANGO_SECRET_KEY", "") or ""
ALLOWED_HOSTS = config.strings("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = config.strings("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "axes",
    "jobs",
    "discord_poller",
]

# The admin's stack. The API paths skip it: see gateway_project.asgi.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as axes asks: it turns the login view's refused attempt into the
    # lockout page on the way out.
    "axes.middleware.AxesMiddleware",
]
API_MIDDLEWARE = ["jobs.middleware.ApiMiddleware"]

ROOT_URLCONF = "gateway_project.urls"
ASGI_APPLICATION = "gateway_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_SQLITE_FILE = BASE_DIR / "db.sqlite3"
_DATABASE_URL = config.string("DATABASE_URL", f"sqlite:///{_SQLITE_FILE}") or ""
try:
    DATABASES = {
        "default": dj_database_url.parse(
            _DATABASE_URL, conn_max_age=600, conn_health_checks=True
        )
    }
except ValueError:  # an unknown scheme, a port that is not a number...
    # (No host is fine: postgres:///name uses the local socket.)
    raise ImproperlyConfigured(
        "DATABASE_URL must be a database URL, like "
        "postgres://user:password@host:5432/name or sqlite:///path/to/db.sqlite3; "
        f"not {redact_url(_DATABASE_URL)!r}."
    ) from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        # IMMEDIATE takes the write lock at BEGIN, so concurrent claimers queue
        # up instead of failing with "database is locked" halfway through.
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # The test database is a file, so that daphne processes started by the
    # tests see what the tests wrote.
    DATABASES["default"]["TEST"] = {
        "NAME": config.string("TEST_SQLITE_FILE", str(BASE_DIR / "test.sqlite3"))
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# axes first: it refuses a locked-out attempt before the password is checked
# (and hashed). It logs nobody in itself, so the model backend follows.
# authenticate() now needs the request (the admin's login form passes it).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": f"django.contrib.auth.password_validation.{name}"}
    for name in (
        "UserAttributeSimilarityValidator",
        "MinimumLengthValidator",
        "CommonPasswordValidator",
        "NumericPasswordValidator",
    )
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Hashed, compressed names where STATIC_MANIFEST says so: a deploy sets it for
# the build's collectstatic, which writes the manifest, and for the servers,
# which read it. Otherwise straight from the apps' folders, so a checkout serves
# its files as they are now, with no build step and no stale collected copy.
STATIC_MANIFEST = config.boolean("STATIC_MANIFEST", False)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if STATIC_MANIFEST
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = not STATIC_MANIFEST

# --- Backing services: chosen here, from REDIS_URL ----------------------------

REDIS_URL = config.url(
    "REDIS_URL",
    "",
    schemes=("redis", "rediss", "unix"),
    example="redis://127.0.0.1:6379/0",
)

# Each process reads every published job from one channel of the channel layer
# (jobs.bus). A process behind on a burst finds the jobs waiting there: at
# the layers' default capacity of 100, the 101st would be dropped unseen.
FANOUT_BACKLOG = 10_000

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
        }
    }
    _CHANNEL_LAYER_BACKENDS = {
        "redis": "channels_redis.core.RedisChannelLayer",
        "redis-pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
    }
    CHANNEL_LAYER = config.string("CHANNEL_LAYER", "redis-pubsub") or ""
    if CHANNEL_LAYER not in _CHANNEL_LAYER_BACKENDS:
        raise ImproperlyConfigured(
            f"CHANNEL_LAYER must be one of {sorted(_CHANNEL_LAYER_BACKENDS)}, "
            f"not {CHANNEL_LAYER!r}."
        )
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": _CHANNEL_LAYER_BACKENDS[CHANNEL_LAYER],
            # capacity: RedisChannelLayer's; the pub/sub layer has no backlog.
            "CONFIG": {"hosts": [REDIS_URL], "capacity": FANOUT_BACKLOG},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYER = "memory"
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": FANOUT_BACKLOG},
        }
    }
    # django-ratelimit refuses LocMem (E003) because counts are per process. The
    # embedded default is one process, where per-process counts are the counts.
    SILENCED_SYSTEM_CHECKS = ["django_ratelimit.E003"]

QUEUE_BACKEND = config.string("QUEUE_BACKEND") or ("redis" if REDIS_URL else "database")
if QUEUE_BACKEND not in ("database", "redis") or (
    QUEUE_BACKEND == "redis" and not REDIS_URL
):
    raise ImproperlyConfigured(
        f"QUEUE_BACKEND must be database, or redis with REDIS_URL set; "
        f"not {QUEUE_BACKEND!r}."
    )
# With the Redis queue: a claim taken from the list and not recorded in the
# table within this many seconds (its process died) is put back at the head.
CLAIM_TIMEOUT_SECONDS = config.number(
    "CLAIM_TIMEOUT_SECONDS", 30.0, minimum=1.0, maximum=3600.0
)

# --- The gateway (contract section 6) -----------------------------------------

# Lists, so that a key can be rotated: any listed value is accepted.
API_KEYS = config.strings("API_KEY")
HMAC_SECRETS = config.strings("HMAC_SECRET")
# Lets a scraper read /metrics with a bearer token instead of signing.
METRICS_TOKEN = config.string("METRICS_TOKEN")
TIMESTAMP_TOLERANCE = config.integer("TIMESTAMP_TOLERANCE", 60, minimum=1)
WS_REQUIRE_SIGNATURE = config.boolean("WS_REQUIRE_SIGNATURE", False)
# Refuse v1 signatures (timestamp only, replayable): docs/security.md.
REQUIRE_SIGNATURE_V2 = config.boolean("REQUIRE_SIGNATURE_V2", False)
# Seconds a ticket from POST /ws/ticket stays good for its one handshake.
WS_TICKET_TTL = config.integer("WS_TICKET_TTL", 30, minimum=1, maximum=300)
# Seconds a refused credential waits for its answer: a flood of forged
# requests then gets one refusal per connection per delay (docs/security.md).
AUTH_FAILURE_DELAY_SECONDS = config.number(
    "AUTH_FAILURE_DELAY_SECONDS", 1.0, minimum=0.0, maximum=10.0
)
# The most that delay grows to for an address refused again and again.
AUTH_FAILURE_MAX_DELAY_SECONDS = config.number(
    "AUTH_FAILURE_MAX_DELAY_SECONDS", 10.0, minimum=0.0, maximum=60.0
)

RATE_LIMIT_PER_MINUTE = config.integer("RATE_LIMIT_PER_MINUTE", 0, minimum=0)
RATE_LIMIT_WINDOW_SECONDS = config.integer("RATE_LIMIT_WINDOW_SECONDS", 60, minimum=1)
# When the rate-limit store (Redis) is down: false answers 503, true lets the
# request through uncounted.
RATE_LIMIT_FAIL_OPEN = config.boolean("RATE_LIMIT_FAIL_OPEN", False)
TRUSTED_PROXY_COUNT = config.integer("TRUSTED_PROXY_COUNT", 0, minimum=0)

# A long-poll woken by nothing for this long looks at the queue again: the
# channel layer that carries its wake-ups delivers at most once (jobs.wakeups).
LONG_POLL_RELOOK_SECONDS = config.number(
    "LONG_POLL_RELOOK_SECONDS", 10.0, minimum=0.1, maximum=60.0
)
JOB_TTL_SECONDS = config.integer("JOB_TTL_SECONDS", 300, minimum=1, maximum=86400)
DEDUP_WINDOW_SECONDS = config.integer("DEDUP_WINDOW_SECONDS", 60, minimum=0)
MAX_JOB_BYTES = config.integer("MAX_JOB_BYTES", 16384, minimum=256)
JOB_RETENTION_HOURS = config.integer("JOB_RETENTION_HOURS", 24, minimum=1)
HEADLESS_MODE = config.boolean("HEADLESS_MODE", True)
# Named filters for tier= (docs/filters.md): {"10m+": "where=money_per_sec>=10M"}.
TIERS = config.json_object("TIERS")
try:
    parse_tiers(TIERS)
except FilterError as exc:
    raise ImproperlyConfigured(f"TIERS: {exc}") from None
PORT = config.integer("PORT", 8000, minimum=1, maximum=65535)
# daphne processes `manage.py serve` runs on one port: every core with Redis to
# share the queue and channel layer, one without (docs/deploy.md).
WEB_CONCURRENCY = config.integer(
    "WEB_CONCURRENCY", available_cores() if REDIS_URL else 1, minimum=1, maximum=64
)

# --- The admin's login throttle (docs/security.md, "The admin login") ----------

# After this many wrong passwords for one account, or from one address, further
# attempts are refused (429, jobs.adminlogin) until the cool-off has passed.
ADMIN_LOGIN_FAILURE_LIMIT = config.integer(
    "ADMIN_LOGIN_FAILURE_LIMIT", 5, minimum=1, maximum=100
)
ADMIN_LOGIN_COOLOFF_MINUTES = config.integer(
    "ADMIN_LOGIN_COOLOFF_MINUTES", 15, minimum=1, maximum=1440
)
# Counted in the database, on both stacks: a cache evicts under load and the
# embedded one empties on restart, either of which would forget a lockout.
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"
AXES_FAILURE_LIMIT = ADMIN_LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = timedelta(minutes=ADMIN_LOGIN_COOLOFF_MINUTES)
# Either reaches the limit: one account tried from many addresses, or one
# address trying many accounts.
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
# Attempts during a lockout are refused unrecorded, so the lockout ends when
# the page says it does, however often someone knocks meanwhile.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
# The API's client-address rule, TRUSTED_PROXY_COUNT included.
AXES_CLIENT_IP_CALLABLE = "jobs.adminlogin.client_address"
AXES_LOCKOUT_CALLABLE = "jobs.adminlogin.lockout_response"
# Log the address, not what was typed as a user name (sometimes a password),
# nor the user agent; and no version banner at every start.
AXES_VERBOSE = False
AXES_SENSITIVE_PARAMETERS = ["username"]

# Django refuses bodies over this before our own MAX_JOB_BYTES check can.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(MAX_JOB_BYTES * 2, 2_621_440)

# --- The Discord poller -------------------------------------------------------

CHANNEL_IDS = config.strings("CHANNEL_ID")
DISCORD_TOKEN = config.string("DISCORD_TOKEN")
DISCORD_API_BASE = config.url(
    "DISCORD_API_BASE",
    "https://discord.com/api/v10",
    schemes=("https", "http"),
    example="https://discord.com/api/v10",
).rstrip("/")
# The page the poller's User-Agent names, "DiscordBot (<url>, <version>)": Discord
# asks a bot to say where to learn about it (docs/poller.md).
DISCORD_BOT_URL = config.string("DISCORD_BOT_URL")
DISCORD_POLL_SECONDS = config.number("DISCORD_POLL_SECONDS", 0.25, minimum=0.0)
BURST_POLL_SECONDS = config.number("BURST_POLL_SECONDS", 0.05, minimum=0.0)
# rest (poll) or gateway (Discord's Gateway); checked by discord_poller.config.
DISCORD_MODE = config.string("DISCORD_MODE", "rest")
# The gateway the poller posts to. A bare host:port, as Render hands over the
# web service's private address (render.yaml), is plain HTTP: the private
# network needs no TLS.
SERVICE_BASE_URL = config.url(
    "SERVICE_BASE_URL",
    f"http://127.0.0.1:{PORT}",
    schemes=("http", "https"),
    bare_scheme="http",
    example="http://127.0.0.1:8000 or job-gateway-a1b2:8000",
).rstrip("/")

# --- Logging ------------------------------------------------------------------

LOG_FORMAT = config.string("LOG_FORMAT", "text")
if LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be text or json, not {LOG_FORMAT!r}.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "jobs.logs.ContextFilter"}},
    "formatters": {
        "text": {"()": "jobs.logs.PlainFormatter"},
        "json": {"()": "jobs.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context"],
        }
    },
    "root": {
        "handlers": ["console"],
        "level": config.choice(
            "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        ),
    },
}

# --- Production: the platform and HTTPS (docs/deploy.md) ----------------------
# Owned by the deploy; everything here is off unless the environment asks.

# Render names the web service's public host: answer to it, and trust it as the
# admin's origin, without anyone copying it into ALLOWED_HOSTS by hand.
RENDER_EXTERNAL_HOSTNAME = config.string("RENDER_EXTERNAL_HOSTNAME")
if RENDER_EXTERNAL_HOSTNAME:
    ALLOWED_HOSTS = [*ALLOWED_HOSTS, RENDER_EXTERNAL_HOSTNAME]
    CSRF_TRUSTED_ORIGINS = [
        *CSRF_TRUSTED_ORIGINS,
        f"https://{RENDER_EXTERNAL_HOSTNAME}",
    ]
# And its name on Render's private network, where the poller posts its jobs
# (render.yaml): the service's slug, which Render sets as RENDER_SERVICE_NAME.
RENDER_SERVICE_NAME = config.string("RENDER_SERVICE_NAME")
if RENDER_SERVICE_NAME:
    ALLOWED_HOSTS = [*ALLOWED_HOSTS, RENDER_SERVICE_NAME]

# One switch for serving behind a proxy that terminates HTTPS. Off by default so
# that a local run over plain HTTP keeps a working admin login.
HTTPS_ONLY = config.boolean("HTTPS_ONLY", False)
if HTTPS_ONLY:
    # The proxy talks HTTP to us and says in X-Forwarded-Proto what the client
    # used. Only behind a proxy that sets it itself (Render's does): otherwise a
    # client could claim HTTPS.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    # Only the admin's stack (SecurityMiddleware) redirects and sends HSTS. The
    # signed API is left alone on purpose: a redirected POST /job loses its
    # body, and API clients ignore HSTS anyway.
    SECURE_SSL_REDIRECT = True
    # Load balancers check health over plain HTTP from inside: never redirect
    # them, whichever handler ends up serving the path.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = config.integer("HSTS_SECONDS", 31_536_000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    # Preloading is hard to undo, and anyone may submit a domain that asks for
    # it: an explicit opt-in, so the check that nags for it is silenced.
    SECURE_HSTS_PRELOAD = config.boolean("HSTS_PRELOAD", False)
    if not SECURE_HSTS_PRELOAD:
        SILENCED_SYSTEM_CHECKS = [
            *globals().get("SILENCED_SYSTEM_CHECKS", []),
            "security.W021",
        ]
