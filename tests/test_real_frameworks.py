"""Real applications' migrations (DESIGN §7, issue 31): a Django project and an Alembic project,
each in its own git repository, migrated by the frameworks themselves (from pip). A release point,
a release with a rename, an added column and a data migration, then: a database-only rollback that
leaves the code ahead is named with what to run, and the whole-release rollback brings code,
configuration and database back in step, as the frameworks' own commands confirm."""
from __future__ import annotations

import json
import subprocess
import sys

from tests import pgfixtures as pf
from tests.test_code_rollback import GIT_ENV, commit_all, git

CALM = {"ROLLBACK_MAX_CPU_PERCENT": "100", "ROLLBACK_MAX_MEMORY_PERCENT": "100"}  # a busy test machine

SETTINGS = '''import os
SECRET_KEY = "test"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "shop"]  # installed apps migrate too
DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": os.environ["APP_DB_NAME"],
                         "HOST": os.environ["APP_DB_HOST"], "PORT": os.environ["APP_DB_PORT"],
                         "USER": os.environ["APP_DB_USER"], "PASSWORD": os.environ["APP_DB_PASSWORD"]}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
'''
MANAGE = '''import os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site_cfg.settings")
from django.core.management import execute_from_command_line
execute_from_command_line(sys.argv)
'''
MODELS_1 = '''from django.db import models


class Product(models.Model):
    name = models.CharField(max_length=100)
    price = models.DecimalField(max_digits=10, decimal_places=2)
'''
MIGRATION_1 = '''from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [migrations.CreateModel(name="Product", fields=[
        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
        ("name", models.CharField(max_length=100)),
        ("price", models.DecimalField(decimal_places=2, max_digits=10))])]
'''
MODELS_2 = '''from django.db import models


class Product(models.Model):
    title = models.CharField(max_length=100)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    price_in_cents = models.IntegerField(null=True)
'''
MIGRATION_2 = '''from django.db import migrations, models


def to_cents(apps, schema_editor):
    Product = apps.get_model("shop", "Product")
    for p in Product.objects.all():
        p.price_in_cents = int(p.price * 100)
        p.save(update_fields=["price_in_cents"])


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]
    operations = [migrations.RenameField("product", "name", "title"),
                  migrations.AddField("product", "price_in_cents", models.IntegerField(null=True)),
                  migrations.RunPython(to_cents, migrations.RunPython.noop)]
'''


def drop_all(server, name):
    """The database and every one the toolkit derived from it (kept, warm, snapshot copies)."""
    conn = pf.connect(server.info)
    try:
        found = [d for (d,) in pf.rows(conn, "SELECT datname FROM pg_database WHERE datname LIKE %s", (name + "%",))]
    finally:
        conn.close()
    for database in found:
        pf.drop_database(server, database)


def app_env(server, name, base):
    info = server.info
    return dict(base, APP_DB_NAME=name, APP_DB_HOST=info.host, APP_DB_PORT=str(info.port), APP_DB_USER=info.user,
                APP_DB_PASSWORD=info.password or "")


def django(repo, env, *args, check=True):
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def release_world(server, tmp_path, name):
    repo = tmp_path / "app"
    (repo / "site_cfg").mkdir(parents=True)
    config = tmp_path / "config"
    config.mkdir()
    (config / "app.yml").write_text("feature: one\n")
    env = pf.script_env(tmp_path, STAGING_DATABASE_URL=pf.url(server, name), PG_BIN_DIR=server.bindir,
                        REPO_PATH=str(repo), CODE_BACKUP_DIR=str(tmp_path / "code_backups"), CONFIG_DIR=str(config),
                        CONFIG_BACKUP_DIR=str(tmp_path / "config_backups"), ENV_FILE=str(tmp_path / "app.env"),
                        ROLLBACK_WARM_COPIES="0", **GIT_ENV, **CALM)  # warm copies are tested elsewhere
    git(repo, "init", "-q", "-b", "main")
    return repo, config, env


def test_django_release_rollback_keeps_code_and_database_in_step(pg_old, tmp_path):
    name = pf.create_database(pg_old, pf.unique_name("django"))
    try:
        repo, config, env = release_world(pg_old, tmp_path, name)
        denv = app_env(pg_old, name, env)
        (repo / "manage.py").write_text(MANAGE)
        (repo / "site_cfg" / "__init__.py").write_text("")
        (repo / "site_cfg" / "settings.py").write_text(SETTINGS)
        (repo / "shop" / "migrations").mkdir(parents=True)
        (repo / "shop" / "__init__.py").write_text("")
        (repo / "shop" / "migrations" / "__init__.py").write_text("")
        (repo / "shop" / "models.py").write_text(MODELS_1)
        (repo / "shop" / "migrations" / "0001_initial.py").write_text(MIGRATION_1)
        (repo / ".gitignore").write_text("__pycache__/\n")
        release_1 = commit_all(repo, "release 1")
        django(repo, denv, "migrate", "-v", "0")
        django(repo, denv, "shell", "-c", "from shop.models import Product; "
               "Product.objects.bulk_create([Product(name='tea', price='3.50'), Product(name='coffee', price='4.20')])")
        made = pf.run_script("rollback_manager.py", "create", "--all", "--description", "Release 1", "--json", env=env)
        assert made.returncode == 0, made.stdout + made.stderr
        listed = pf.run_script("rollback_manager.py", "list", env=env).stdout
        assert "django: auth 0012_alter_user_first_name_max_length, contenttypes 0002_remove_content_type_name, " \
               "shop 0001_initial" in listed, listed
        # release 2: a rename, an added column and a data migration, in code and database
        (repo / "shop" / "models.py").write_text(MODELS_2)
        (repo / "shop" / "migrations" / "0002_title_and_cents.py").write_text(MIGRATION_2)
        commit_all(repo, "release 2")
        (config / "app.yml").write_text("feature: two\n")
        django(repo, denv, "migrate", "-v", "0")
        # the database alone goes back: the code is ahead, Django sees it, and so does the toolkit
        rolled = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert "shop 0002_title_and_cents" in rolled.stdout and "out of step" in rolled.stdout, rolled.stdout
        assert f"code_rollback.py rollback {release_1[:12]}" in rolled.stdout
        assert django(repo, denv, "migrate", "--check", check=False).returncode != 0
        strict = pf.run_script("database_rollback.py", "verify", "--strict", env=env)
        assert strict.returncode == 4 and "out of step" in strict.stdout, strict.stdout + strict.stderr
        # forward again, then the whole release back: code, configuration and database
        django(repo, denv, "migrate", "-v", "0")
        whole = pf.run_script("rollback_manager.py", "restore", "--all", "--latest", "--yes", env=env)
        assert whole.returncode == 0, whole.stdout + whole.stderr
        assert git(repo, "rev-parse", "HEAD").strip() == release_1 and (config / "app.yml").read_text() == "feature: one\n"
        shown = django(repo, denv, "showmigrations", "shop").stdout
        assert "[X] 0001_initial" in shown and "0002" not in shown, shown
        django(repo, denv, "migrate", "--check")  # exits 0: nothing unapplied, nothing unknown
        query = django(repo, denv, "shell", "-c", "from shop.models import Product; "
                       "print(sorted((p.name, str(p.price)) for p in Product.objects.all()))").stdout
        assert query.strip().splitlines()[-1] == "[('coffee', '4.20'), ('tea', '3.50')]", query
        verify = pf.run_script("database_rollback.py", "verify", "--strict", env=env)
        assert verify.returncode == 0 and "out of step" not in verify.stdout, verify.stdout + verify.stderr
    finally:
        drop_all(pg_old, name)


ALEMBIC_INI = "[alembic]\nscript_location = %(here)s/migrations\n"
ALEMBIC_ENV = '''import os
from alembic import context
from sqlalchemy import create_engine

engine = create_engine("postgresql+psycopg2://", connect_args={
    "dbname": os.environ["APP_DB_NAME"], "host": os.environ["APP_DB_HOST"], "port": os.environ["APP_DB_PORT"],
    "user": os.environ["APP_DB_USER"], "password": os.environ["APP_DB_PASSWORD"]})
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
'''
REVISION_A1 = '''import sqlalchemy as sa
from alembic import op

revision = "a1"
down_revision = None


def upgrade():
    op.create_table("item", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text, nullable=False))
    op.execute("INSERT INTO item (name) VALUES ('bolt'), ('nut')")


def downgrade():
    op.drop_table("item")
'''
REVISION_B2 = '''import sqlalchemy as sa
from alembic import op

revision = "b2"
down_revision = "a1"


def upgrade():
    op.alter_column("item", "name", new_column_name="title")
    op.add_column("item", sa.Column("qty", sa.Integer))
    op.execute("UPDATE item SET qty = 10")


def downgrade():
    op.drop_column("item", "qty")
    op.alter_column("item", "title", new_column_name="name")
'''


def alembic(repo, env, *args):
    done = subprocess.run([sys.executable, "-m", "alembic", "-c", str(repo / "alembic.ini"), *args], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_alembic_release_rollback_keeps_code_and_database_in_step(pg_old, tmp_path):
    name = pf.create_database(pg_old, pf.unique_name("alembic"))
    try:
        repo, config, env = release_world(pg_old, tmp_path, name)
        aenv = app_env(pg_old, name, env)
        (repo / "migrations" / "versions").mkdir(parents=True)
        (repo / "alembic.ini").write_text(ALEMBIC_INI)
        (repo / "migrations" / "env.py").write_text(ALEMBIC_ENV)
        (repo / "migrations" / "versions" / "a1_items.py").write_text(REVISION_A1)
        (repo / ".gitignore").write_text("__pycache__/\n")
        release_1 = commit_all(repo, "release 1")
        alembic(repo, aenv, "upgrade", "head")
        made = pf.run_script("rollback_manager.py", "create", "--all", "--description", "Release 1", env=env)
        assert made.returncode == 0, made.stdout + made.stderr
        (repo / "migrations" / "versions" / "b2_title_qty.py").write_text(REVISION_B2)
        commit_all(repo, "release 2")
        alembic(repo, aenv, "upgrade", "head")
        rolled = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert "alembic: the code's head is b2, the database is at a1" in rolled.stdout, rolled.stdout
        assert "a1" in alembic(repo, aenv, "current") and "(head)" not in alembic(repo, aenv, "current")
        report = json.loads(pf.run_script("database_rollback.py", "verify", "--json", env=env).stdout)
        assert report["migration_heads"] == {"alembic": "a1"} and report["code_out_of_step"], report
        whole = pf.run_script("rollback_manager.py", "restore", "--all", "--latest", "--yes", env=env)
        assert whole.returncode == 0, whole.stdout + whole.stderr
        assert git(repo, "rev-parse", "HEAD").strip() == release_1
        assert "a1 (head)" in alembic(repo, aenv, "current")
        report = json.loads(pf.run_script("database_rollback.py", "verify", "--json", "--strict", env=env).stdout)
        assert report["code_out_of_step"] == [] and report["ok"], report
    finally:
        drop_all(pg_old, name)


