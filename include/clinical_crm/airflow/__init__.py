"""Everything that knows Airflow: the DAG factory (one DAG per flow per connection file), the
`veeva_vault` hook and connection type, the provider entry point and the UI plugin. Nothing
below this package imports Airflow."""
