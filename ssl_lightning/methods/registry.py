from ssl_lightning.registry import Registry

#: every pretraining method by name (``METHODS.get("simclr")`` -> the class)
METHODS: Registry = Registry("method")
