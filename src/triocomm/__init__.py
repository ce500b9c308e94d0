"""triocomm: a Trio-native framework for message-oriented network clients and servers.

The public surface is exactly the names below; everything else lives in
private modules and may change.
"""

from ._client import Client as Client
from ._client import Target as Target
from ._client import open_client as open_client
from ._connection import Connection as Connection
from ._connection import ConnectionStats as ConnectionStats
from ._connection import ConnState as ConnState
from ._connection import Idle as Idle
from ._datagram_service import DatagramPeer as DatagramPeer
from ._datagram_service import serve_datagrams as serve_datagrams
from ._errors import CommError as CommError
from ._errors import CommTimeout as CommTimeout
from ._errors import ConnectError as ConnectError
from ._errors import ConnectionLost as ConnectionLost
from ._errors import FrameTooLarge as FrameTooLarge
from ._errors import ProtocolError as ProtocolError
from ._errors import UpstreamUnavailable as UpstreamUnavailable
from ._framing import Codec as Codec
from ._framing import Decoder as Decoder
from ._framing import LengthPrefixed as LengthPrefixed
from ._framing import Lines as Lines
from ._framing import Raw as Raw
from ._observe import ObservedPeer as ObservedPeer
from ._observe import Observer as Observer
from ._pool import PoolStats as PoolStats
from ._resolve import CachingResolver as CachingResolver
from ._resolve import DnsResolver as DnsResolver
from ._resolve import Resolution as Resolution
from ._resolve import Resolver as Resolver
from ._retry import RetryPolicy as RetryPolicy
from ._server import Server as Server
from ._server import ServerStats as ServerStats
from ._server import serve as serve
from ._server import serve_connections as serve_connections
from ._timeouts import ServerTimeouts as ServerTimeouts
from ._timeouts import Timeouts as Timeouts
from ._upstream import AddressStats as AddressStats
from ._upstream import Upstream as Upstream
from ._upstream import UpstreamAttempt as UpstreamAttempt
from ._version import __version__ as __version__
from ._workers import WorkerGroup as WorkerGroup
from ._workers import serve_workers as serve_workers

__all__ = [
    "AddressStats",
    "CachingResolver",
    "Client",
    "Codec",
    "CommError",
    "CommTimeout",
    "ConnState",
    "ConnectError",
    "Connection",
    "ConnectionLost",
    "ConnectionStats",
    "DatagramPeer",
    "Decoder",
    "DnsResolver",
    "FrameTooLarge",
    "Idle",
    "LengthPrefixed",
    "Lines",
    "ObservedPeer",
    "Observer",
    "PoolStats",
    "ProtocolError",
    "Raw",
    "Resolution",
    "Resolver",
    "RetryPolicy",
    "Server",
    "ServerStats",
    "ServerTimeouts",
    "Target",
    "Timeouts",
    "Upstream",
    "UpstreamAttempt",
    "UpstreamUnavailable",
    "WorkerGroup",
    "open_client",
    "serve",
    "serve_connections",
    "serve_datagrams",
    "serve_workers",
]
