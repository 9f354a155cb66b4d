"""The base every layer stands on: settings, errors, files written whole, logging, hardware, metrics, weights, caches."""
