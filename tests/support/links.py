"""Members of a test network for in-process link tests: a network CA and credentials signed by it."""
from __future__ import annotations

from cryptography import x509

from worker import pki
from worker.link import Credentials

#: The network id the in-process link tests use.
NET = "net-1"


def credentials(ca, node_id: str, role: str, network_id: str = NET) -> Credentials:
    """A member's credentials on ``ca``'s network (``ca`` = (key, certificate) of
    ``pki.create_network_ca``): a fresh P-256 key and a certificate for ``role``."""
    ca_key, ca_cert = ca
    key = pki.new_node_key()
    cert_pem = pki.sign_node_certificate(ca_key, ca_cert, pki.make_csr(key, node_id, network_id), node_id, role)
    return Credentials(network_id, node_id, role, x509.load_pem_x509_certificate(cert_pem), key, ca_cert)


def admin_and_worker(name: str) -> tuple:
    """(ca, admin credentials "admin-1", worker credentials "worker-1") of a fresh network called ``name``."""
    ca = pki.create_network_ca(NET, name)
    return ca, credentials(ca, "admin-1", "admin"), credentials(ca, "worker-1", "worker")
