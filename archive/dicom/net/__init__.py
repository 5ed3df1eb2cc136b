"""pacsvault's own DICOM network engine, sans-I/O (as h11 is for HTTP).

* ``pdu``: the PS3.8 Upper Layer PDUs, encoded and decoded, with every length
  bounded by an explicit limit; ``PduDecoder`` takes bytes as they arrive and
  hands out whole PDUs, refusing an oversized one from its header alone.
* ``dimse``: the PS3.7 command set (group 0000) codec and the assembly of
  P-DATA fragments into commands and data sets.
* ``association``: the PS3.8 state machine, either role; ``negotiation``: the
  acceptor's answer to an A-ASSOCIATE-RQ.
* ``driver`` (acceptor) and ``client`` (requestor, the C-STORE SCU): the thin
  blocking-socket loops around an association.

Apart from those two drivers, nothing here touches a socket.
"""
