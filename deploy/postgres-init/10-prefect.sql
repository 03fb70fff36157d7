-- Runs once, when the postgres volume is first initialised: the Prefect server's own database
-- (MLflow's, `mlflow`, is POSTGRES_DB). Both belong to POSTGRES_USER.
CREATE DATABASE prefect;
