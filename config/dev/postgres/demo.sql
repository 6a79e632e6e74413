-- Demo data behind the `demo-db` target. Run as the bootstrap superuser by broker/devstack.py.
-- `vaultadmin` is the account OpenBao's database secrets engine uses to create and drop the
-- short-lived per-task roles: it may create roles and end their sessions, and it owns the demo
-- tables so it can grant SELECT on them. It is not a superuser.
CREATE ROLE vaultadmin WITH LOGIN CREATEROLE PASSWORD :'vault_password';
GRANT pg_signal_backend TO vaultadmin WITH ADMIN OPTION;
CREATE DATABASE demo OWNER vaultadmin;
\connect demo
SET ROLE vaultadmin;
CREATE TABLE orders (
    id        integer PRIMARY KEY,
    customer  text    NOT NULL,
    amount    numeric(10, 2) NOT NULL
);
INSERT INTO orders (id, customer, amount) VALUES
    (1, 'acme', 120.00),
    (2, 'globex', 75.50),
    (3, 'initech', 310.25);
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
