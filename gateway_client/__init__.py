"""The Job Gateway's reference Python client. Django-free."""
