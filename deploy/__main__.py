from deploy.cli import app

app()
