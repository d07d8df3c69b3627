"""Real kube-apiservers for the tests in this folder: the shared one, and a test's own."""

from .apiserver import kube_apiserver, own_kube_apiserver

__all__ = ["kube_apiserver", "own_kube_apiserver"]
