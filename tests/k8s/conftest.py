"""The session's real kube-apiserver, for every test in this folder."""

from .apiserver import kube_apiserver

__all__ = ["kube_apiserver"]
