-- The audit log out of reach of the application's own role.
--
-- Core migration 4's triggers refuse UPDATE, DELETE and TRUNCATE for every role, but the
-- table's owner could still disable them (ALTER TABLE ... DISABLE TRIGGER) or drop the table,
-- and the owner of its schema could drop it too. So the table and its trigger function move
-- to the schema `cascade_audit`, and the three belong to `cascade_audit_owner`: a role that
-- cannot log in and of which no role stays a member. The migrating role (the application's)
-- keeps SELECT and INSERT on the table, and a view `audit_log` in the table's old schema
-- (owned by the migrating role) keeps every query's name. Dropping or renaming that view
-- touches no row: the rows are in `cascade_audit.audit_log`.
--
-- This needs a migrating role that may create roles (a superuser, or CREATEROLE) and schemas
-- (CREATE on the database). Without them nothing changes and a WARNING says so.
--
-- What it cannot stop: a superuser (who can disable the triggers, drop the table, or change
-- rows); a role with CREATEROLE (which on PostgreSQL 15 and older can grant itself membership
-- in any role that is not a superuser, and on 16 and later holds ADMIN on the roles it
-- created): serve with a role without it (`ALTER ROLE ... NOCREATEROLE` after migrating);
-- and the database's owner dropping the whole database.
--
-- A later migration that adds a column to the table must recreate the view (`SELECT *` is
-- expanded when a view is created).
DO $$
DECLARE
    migrator name := current_user;
    home     name;
BEGIN
    IF NOT (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = migrator)
       OR NOT has_database_privilege(current_database(), 'CREATE') THEN
        RAISE WARNING 'audit_log stays owned by %, which can disable its append-only triggers or drop it: run the migrations as a role that may create roles and schemas to hand it to cascade_audit_owner', migrator;
        RETURN;
    END IF;
    BEGIN
        CREATE ROLE cascade_audit_owner NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN
        -- Made by the migration of another database of this cluster (roles are the
        -- cluster's), perhaps at the same time.
        NULL;
    END;
    SELECT n.nspname INTO home
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'audit_log'::regclass;
    BEGIN
        -- Handing objects to a role needs membership in it: for these statements only.
        EXECUTE format('GRANT cascade_audit_owner TO %I', migrator);
        CREATE SCHEMA cascade_audit;
        ALTER TABLE audit_log SET SCHEMA cascade_audit;
        ALTER FUNCTION audit_log_is_append_only() SET SCHEMA cascade_audit;
        ALTER SCHEMA cascade_audit OWNER TO cascade_audit_owner;
        ALTER TABLE cascade_audit.audit_log OWNER TO cascade_audit_owner;
        ALTER FUNCTION cascade_audit.audit_log_is_append_only() OWNER TO cascade_audit_owner;
        EXECUTE format('GRANT USAGE ON SCHEMA cascade_audit TO %I', migrator);
        EXECUTE format('GRANT SELECT, INSERT ON cascade_audit.audit_log TO %I', migrator);
        EXECUTE format('CREATE VIEW %I.audit_log AS SELECT * FROM cascade_audit.audit_log', home);
        EXECUTE format('REVOKE cascade_audit_owner FROM %I', migrator);
    EXCEPTION WHEN insufficient_privilege THEN
        -- PostgreSQL 16 and later: CREATEROLE grants only the roles its holder administers,
        -- and another database's migration made this one. Everything above is undone.
        RAISE WARNING 'audit_log stays owned by % (%): grant it ADMIN on cascade_audit_owner, or migrate as a superuser, to hand it over', migrator, SQLERRM;
    END;
END
$$;
