"""Where the client finds host, project and key, and how it keeps the key secret."""

import pytest

from ray_cml_provider.cml import CMLClient, CMLConfigurationError, CMLSettings, Secret

KEY = "s3cr3t-key-value"


def test_explicit_arguments_win_over_environment():
    env = {
        "CML_HOST": "env.example.com",
        "CML_PROJECT_ID": "env-proj",
        "CML_API_KEY": "envkey",
        "CDSW_DOMAIN": "cdsw.example.com",
        "CDSW_PROJECT_ID": "cdsw-proj",
        "CDSW_APIV2_KEY": "cdswkey",
    }
    s = CMLSettings.resolve(
        host="arg.example.com", project_id="arg-proj", api_key="argkey", env=env
    )
    assert (s.host, s.project_id, s.api_key.reveal()) == (
        "https://arg.example.com",
        "arg-proj",
        "argkey",
    )


def test_user_environment_wins_over_cml_engine_variables():
    env = {
        "CML_HOST": "https://env.example.com/",
        "CML_PROJECT_ID": "env-proj",
        "CML_API_KEY": "envkey",
        "CDSW_DOMAIN": "cdsw.example.com",
        "CDSW_PROJECT_ID": "cdsw-proj",
        "CDSW_APIV2_KEY": "cdswkey",
    }
    s = CMLSettings.resolve(env=env)
    assert (s.host, s.project_id, s.api_key.reveal()) == (
        "https://env.example.com",
        "env-proj",
        "envkey",
    )


def test_inside_cml_the_engine_variables_are_enough():
    env = {
        "CDSW_DOMAIN": "ml-1234.example.cloudera.site",
        "CDSW_PROJECT_ID": "abcd-efgh",
        "CDSW_APIV2_KEY": "enginekey",
    }
    s = CMLSettings.resolve(env=env)
    assert s.host == "https://ml-1234.example.cloudera.site"
    assert s.project_id == "abcd-efgh"
    assert s.api_key.reveal() == "enginekey"


def test_cdsw_api_url_keeps_its_scheme_and_loses_its_version_suffix():
    env = {
        "CDSW_API_URL": "http://127.0.0.1:8080/api/v1",
        "CDSW_DOMAIN": "127.0.0.1:8080",
        "CDSW_PROJECT_ID": "p",
        "CDSW_APIV2_KEY": "k",
    }
    assert CMLSettings.resolve(env=env).host == "http://127.0.0.1:8080"


def test_api_key_env_names_the_variable():
    env = {"CML_HOST": "h", "CML_PROJECT_ID": "p", "MY_TEAM_KEY": "teamkey", "CML_API_KEY": "other"}
    assert CMLSettings.resolve(api_key_env="MY_TEAM_KEY", env=env).api_key.reveal() == "teamkey"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"CML_PROJECT_ID": "p", "CML_API_KEY": "k"}, ["host", "CML_HOST", "CDSW_DOMAIN"]),
        (
            {"CML_HOST": "h", "CML_API_KEY": "k"},
            ["project", "project_id", "CML_PROJECT_ID", "CDSW_PROJECT_ID"],
        ),
        ({"CML_HOST": "h", "CML_PROJECT_ID": "p"}, ["API key", "CML_API_KEY", "CDSW_APIV2_KEY"]),
    ],
)
def test_a_missing_setting_is_one_sentence_naming_the_three_ways(env, words):
    with pytest.raises(CMLConfigurationError) as info:
        CMLSettings.resolve(env=env)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_client_without_project_can_list_runtimes_but_not_project_things(monkeypatch):
    for name in ("CML_PROJECT_ID", "CDSW_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)
    client = CMLClient(host="h.example.com", api_key=KEY)
    with pytest.raises(CMLConfigurationError, match="CML_PROJECT_ID"):
        client.list_applications()


def test_the_key_never_shows_in_reprs():
    s = CMLSettings.resolve(host="h", project_id="p", api_key=KEY, env={})
    client = CMLClient(s)
    for text in (
        repr(s),
        str(s),
        repr(client),
        repr(s.api_key),
        f"{s.api_key}",
        repr(client._transport),
    ):
        assert KEY not in text
    assert Secret(KEY) == Secret(KEY)
