"""The `reformer-export` command line (click), a thin layer over exporters.api."""
