"""The secret-sharing engine: CrypTen over a mutual-TLS channel, with a dealer.

- `channel.MtlsChannel`: framed TLS 1.3 connections between named parties;
- `communicator.ChannelCommunicator`: CrypTen's communicator on that channel;
- `dealer`: CrypTen's trusted-third-party tuples served over the channel;
- `session.SsSession` / `session.DealerSession`: long-lived per-node sessions;
- `loopback.LoopbackCluster`: the three parties as local processes (tests, benches).

Import the submodules you need; importing this package does not load CrypTen.
"""
