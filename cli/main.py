import click

@click.group()
def main():
    """suncet"""
