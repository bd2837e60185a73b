"""`reformer-serve REPOSITORY`: Triton Inference Server on a model repository that `reformer-export --format
triton` wrote, in the foreground until Ctrl-C or SIGTERM, which stop the server and its model processes (exit
status 0), or until the server or one of its models' processes ends (one `Error:` line, exit status 1, so that
a supervisor restarts it: Triton itself goes on answering a model whose process died with errors); thin over
exporters.triton.server.TritonServer."""

from __future__ import annotations

import os

import click

from cli.main import terminate_as_interrupt
from exporters.triton.server import DEFAULT_PORTS, TritonServer, TritonServerError  # standard library only
from reformer.messages import first_line


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("repository", type=click.Path(exists=True, file_okay=False))
@click.option("--http-port", type=click.IntRange(1, 65535), default=DEFAULT_PORTS["http"], show_default=True,
              help="Port of the HTTP/REST endpoint (KServe v2 protocol).")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=DEFAULT_PORTS["grpc"], show_default=True,
              help="Port of the gRPC endpoint.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=DEFAULT_PORTS["metrics"], show_default=True,
              help="Port of the Prometheus metrics endpoint.")
@click.option("--server", "binary", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The tritonserver binary to run. Default: tritonserver on the PATH, else the one of the "
                   "nvidia-pytriton wheel (pip install 'reformer-export[serve]').")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None,
              help="Append the server's log to this file. Default: a temporary file, removed when the server stops "
                   "(its last lines are shown when the server fails).")
def main(repository, http_port, grpc_port, metrics_port, binary, log_path):
    """Serve a model repository (reformer-export --format triton) with Triton Inference Server until Ctrl-C.

    Example: reformer-serve byte-lm-triton"""
    server = TritonServer(repository, http_port, grpc_port, metrics_port, binary=binary, log_path=log_path)
    models = sorted(name for name in os.listdir(repository)
                    if os.path.isfile(os.path.join(repository, name, "config.pbtxt")))
    try:
        with terminate_as_interrupt():
            try:
                click.echo(f"Starting Triton Inference Server on {repository} ...", err=True)
                server.start()
                click.echo(f"Serving {', '.join(models)} over HTTP at {server.http_url} and gRPC at {server.grpc_url} "
                           f"(metrics at localhost:{metrics_port}/metrics); Ctrl-C stops the server.")
                server.wait()
            finally:
                status = server.stop()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the way to stop a server, so a success
        click.echo(f"Stopped (server exit status {status}).", err=True)
    except TritonServerError as error:
        raise click.ClickException(first_line(error)) from None


if __name__ == "__main__":
    main()
