"""The network descriptions shipped with rayledger (``local.toml``, ``multisite.toml``), as
package data, so that ``rayledger up`` and the other commands find their default config from
any directory, in a source checkout or an installed wheel (``cluster.network.config_path``)."""
