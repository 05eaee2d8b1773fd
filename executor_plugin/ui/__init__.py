"""The Edge agents page of the Airflow UI and its REST API (a FastAPI sub-app the plugin mounts).

Importing this package loads nothing: the gateway imports :mod:`executor_plugin.ui.log_notice`
alone, and the app is built only by the api-server (``executor_plugin.ui.app.create_app``).
"""
