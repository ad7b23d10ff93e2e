"""ipmpi: interactive parallel Python for supercomputers.

A controller and engines run as one MPI job; clients attach over TLS:

    from ipmpi import client
    mec = client.MultiEngineClient()

Importing the package itself is cheap and needs neither MPI nor the C
extension: engines import ipmpi._engine, clients ipmpi.client.
"""
__version__ = "0.1.0"
