"""The ``triocomm`` command line: ``triocomm serve`` and ``triocomm bench``.

``serve`` runs an echo service on any built-in codec; ``bench`` is a load
generator built on triocomm's own client that checks every echoed reply and
reports throughput, latency percentiles and a latency histogram. With no
address, ``bench`` starts an embedded echo service in its own process, so
``triocomm bench`` alone works on a fresh install.

The package sits on top of every other layer and uses only triocomm's public
API, exactly as a user program would. Its modules, from the entry point down:

* ``_main``: ``main``, which parses the arguments, runs a command under Trio
  and turns a failure into one line and an exit status;
* ``_arguments``: defaults, codec choices, address and value parsing, the parser;
* ``_serve``: the ``serve`` command and its logging (``-v``);
* ``_echo_service``: the echo handler and service both commands start;
* ``_bench``: the ``bench`` command: the probe request, the run, the signals;
* ``_load``: the load generator: request payloads, sessions, workers, the
  shared bookkeeping of a run (``LoadRun``);
* ``_progress``: the live progress line on stderr;
* ``_report``: what a run measured, as text or JSON;
* ``_histogram``: the latency histogram;
* ``_formatting`` and ``_failure``: output helpers, exit codes, ``CliFailure``.

The pieces that need no network (parsing, the histogram, the report) are
plain functions and classes, tested without sockets.
"""

from ._main import main as main

__all__ = ["main"]
