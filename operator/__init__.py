"""The kopf operator reconciling AnalyticsPipeline objects into a ConfigMap and a CronJob."""
